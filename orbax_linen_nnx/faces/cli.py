"""`orbax-linen-nnx`: inspect, plan, convert and compare checkpoints from the shell.

    orbax-linen-nnx inspect ckpts/linen/100
    orbax-linen-nnx plan ckpts/linen/100 --target my_model:abstract_state --rules my_model:RULES
    orbax-linen-nnx convert ckpts/linen/100 ckpts/nnx/100 --to nnx --rules my_model:RULES
    orbax-linen-nnx compare ckpts/linen/100 ckpts/nnx/100 --rules my_model:RULES

Exit status: 0 done (compare: the checkpoints match), 1 values differ (compare),
2 bad command line, 3 cannot plan, 4 source unreadable, 5 destination refused,
6 storage or runtime failure (disk full, permissions, network; nothing finished is left at DST).
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import importlib
import importlib.util
import json
import os
import re
import shlex
import sys
from typing import Any, Sequence

from etils import epath

EXIT_OK, EXIT_DIFFER, EXIT_USAGE, EXIT_PLAN, EXIT_UNREADABLE, EXIT_DESTINATION, EXIT_RUNTIME = 0, 1, 2, 3, 4, 5, 6

_EXIT_MEANING = {
  EXIT_OK: 'done',
  EXIT_DIFFER: 'values differ',
  EXIT_USAGE: 'bad command line',
  EXIT_PLAN: 'cannot plan',
  EXIT_UNREADABLE: 'source unreadable',
  EXIT_DESTINATION: 'destination refused',
  EXIT_RUNTIME: 'storage or runtime failure',
}

# TensorStore and Orbax report storage failures as errors whose text starts with the status of the failed
# operation (absl status codes): those are failures of the run, not of the command line.
_RUNTIME_STATUS = re.compile(
  r'\s*(RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS|'
  r'ABORTED|INTERNAL|UNKNOWN|CANCELLED|UNAUTHENTICATED):'
)


def _runtime_failure(e: BaseException) -> bool:
  """Whether `e` (or what it was raised from) is a storage or runtime failure rather than a bad command."""
  while e is not None:
    if isinstance(e, OSError) or (isinstance(e, ValueError) and _RUNTIME_STATUS.match(str(e))):
      return True
    e = e.__cause__ or e.__context__  # type: ignore[assignment]  # None ends the loop
  return False


class UsageError(ValueError):
  """A command line that names something that is not there (a rules module, a bad --stacks)."""


def _load(spec: str, what: str) -> Any:
  """`module:NAME` or `path/to/file.py:NAME`: the named object."""
  module_name, sep, name = spec.rpartition(':')
  if not sep or not module_name or not name:
    raise UsageError(f'{what} {spec!r} must be module:NAME (or path/to/file.py:NAME)')
  try:
    if module_name.endswith('.py'):
      loader = importlib.util.spec_from_file_location(epath.Path(module_name).stem, module_name)
      if loader is None or loader.loader is None or not epath.Path(module_name).exists():
        raise UsageError(f'{what} {spec!r}: no file {module_name}')
      module = importlib.util.module_from_spec(loader)
      loader.loader.exec_module(module)
    else:
      sys.path.insert(0, '.')
      module = importlib.import_module(module_name)
  except ImportError as e:
    raise UsageError(f'{what} {spec!r}: cannot import {module_name} ({e})') from e
  if not hasattr(module, name):
    raise UsageError(f'{what} {spec!r}: {module_name} has no {name!r}')
  return getattr(module, name)


def _path(text: str) -> str:
  """A local path made absolute (Orbax wants absolute paths); URLs (gs://...) as given."""
  return text if '://' in text else os.path.abspath(text)


def _stacks(text: str | None) -> Any:
  if text is None:
    return None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise UsageError(f"--stacks must be JSON like '{{\"layers\": {{\"linen\": 1, \"nnx\": 0}}}}': {e}") from e


def _mapping(args) -> tuple[Any, Any]:
  """The --rules and --stacks a command was given (None where not); `--rules auto` infers the renames."""
  from orbax_linen_nnx.planning import rules as rules_lib

  if args.rules == rules_lib.AUTO:
    return rules_lib.AUTO, _stacks(args.stacks)
  if args.rules and ':' not in args.rules and rules_lib.near_auto(args.rules):
    raise UsageError(f'--rules {args.rules!r}: did you mean --rules auto (lower case), which infers the renames?')
  return (_load(args.rules, '--rules') if args.rules else None), _stacks(args.stacks)


_UNITS = {
  '': 1,
  'b': 1,
  'k': 10**3,
  'kb': 10**3,
  'kib': 2**10,
  'm': 10**6,
  'mb': 10**6,
  'mib': 2**20,
  'g': 10**9,
  'gb': 10**9,
  'gib': 2**30,
}


def _bytes(text: str) -> int:
  m = re.fullmatch(r'\s*([\d.]+)\s*([a-zA-Z]*)\s*', text)
  if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
    raise argparse.ArgumentTypeError(f'{text!r} is no size: write e.g. 512MiB, 1GB or a number of bytes')
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog='orbax-linen-nnx',
    description='Inspect, plan, convert and compare Orbax checkpoints between the Flax Linen and NNX layouts.',
    epilog='exit status: ' + ', '.join(f'{c} {m}' for c, m in _EXIT_MEANING.items()) + ' (compare: 0 they match)',
  )
  from orbax_linen_nnx import __version__

  p.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
  sub = p.add_subparsers(dest='command', required=True)

  def source(q, name='ckpt', help='a checkpoint: an item, a step or a run directory (its latest step)'):
    q.add_argument(name, type=_path, help=help)

  def mapping(q):
    q.add_argument(
      '--rules',
      metavar='MODULE:NAME',
      help="mapping rules (a list, dict or callable; see docs/rules.md), or 'auto' to infer the renames",
    )
    q.add_argument('--stacks', metavar='JSON', help='layer axes: \'{"layers": {"linen": 1, "nnx": 0}}\'')

  def quiet(q, what='no progress bars (also off when not a terminal)'):
    q.add_argument('--quiet', '-q', action='store_true', help=what)

  def verbose(q, what):
    q.add_argument('--verbose', '-v', action='store_true', help=f'also print {what}')

  def command(name, summary, examples, codes):
    """A subcommand whose --help has its description, examples and its own exit codes."""
    return sub.add_parser(
      name,
      help=summary,
      description=summary[:1].upper() + summary[1:] + '.',
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='examples:\n'
      + '\n'.join(f'  orbax-linen-nnx {name} {e}' for e in examples)
      + '\n\nexit status: '
      + ', '.join(f'{c} {_EXIT_MEANING[c]}' for c in codes),
    )

  q = command(
    'inspect',
    'what a checkpoint holds: layout, step, optimizer, stacks, arrays',
    ['ckpts/linen/100', 'ckpts/linen --json | python -m json.tool'],
    (EXIT_OK, EXIT_USAGE, EXIT_UNREADABLE, EXIT_RUNTIME),
  )
  source(q)
  q.add_argument('--json', action='store_true', help='machine-readable output')
  quiet(q, 'the header only (layout, step, optimizer, stacks, totals), not the array tree')
  verbose(q, "each array's stored name (what rules and errors call a source)")

  q = command(
    'plan',
    'the plan of restoring SRC into a target, or why it cannot be made',
    [
      'ckpts/linen/100 --target model.py:abstract_state --rules auto',
      'ckpts/linen/100 --target model.py:abstract_state --suggest-rules > rules.py',
      'ckpts/linen/100 --to nnx --processes 64 --budget 256MiB',
    ],
    (EXIT_OK, EXIT_USAGE, EXIT_PLAN, EXIT_UNREADABLE, EXIT_RUNTIME),
  )
  source(q, 'src')
  how = q.add_mutually_exclusive_group(required=True)
  how.add_argument(
    '--target',
    metavar='CKPT|MODULE:FUNCTION',
    help='a checkpoint whose tree to match, or a function returning an abstract state',
  )
  how.add_argument('--to', choices=('nnx', 'linen'), help='the layout, with no model (the tree it saves)')
  mapping(q)
  q.add_argument('--partial', action='store_true', help='restore what has a source; report the rest')
  q.add_argument(
    '--processes',
    type=int,
    default=1,
    metavar='N',
    help='what a convert of it costs each of N processes (--distributed), from metadata',
  )
  q.add_argument(
    '--budget', type=_bytes, default=None, metavar='SIZE', help='the convert budget to cost (default 32MiB)'
  )
  q.add_argument(
    '--max-over-read',
    type=float,
    default=4.0,
    metavar='F',
    help='warn where a process of the restore decodes more than F times what its devices need',
  )
  q.add_argument(
    '--host-memory-limit',
    type=_bytes,
    default=None,
    metavar='SIZE',
    help="warn where a process's read, or a convert, may hold more than SIZE on the host",
  )
  q.add_argument('--strict-cost', action='store_true', help='fail (exit 3) where those would warn')
  verbose(
    q,
    "what a convert of it costs each process (also printed with --processes or --budget), and a plan"
    " error's problems leaf by leaf",
  )
  quiet(q, "the plan's first line only (what it reads and keeps); warnings still print")
  q.add_argument('--json', action='store_true', help='the plan as JSON (schema: RestorePlan.as_json)')
  q.add_argument(
    '--suggest-rules',
    action='store_true',
    help='print the renames inferred from the two trees as a rules module (--rules FILE:RULES loads'
    ' it); with --rules FILE:NAME, those rules come first and the rest is inferred',
  )

  q = command(
    'convert',
    'write SRC in another layout as a new checkpoint, in bounded memory',
    [
      'ckpts/linen/100 ckpts/nnx/100 --to nnx --rules rules.py:RULES',
      'ckpts/linen/100 ckpts/nnx/100 --target model.py:abstract_state --rules auto',
    ],
    (EXIT_OK, EXIT_USAGE, EXIT_PLAN, EXIT_UNREADABLE, EXIT_DESTINATION, EXIT_RUNTIME),
  )
  source(q, 'src')
  q.add_argument('dst', type=_path, help='the step directory to write (its item goes under it)')
  how = q.add_mutually_exclusive_group(required=True)
  how.add_argument('--to', choices=('nnx', 'linen'), help='the layout to write, no model needed')
  how.add_argument('--target', metavar='CKPT|MODULE:FUNCTION', help='write exactly this tree')
  mapping(q)
  q.add_argument('--overwrite', action='store_true', help='replace DST if it exists')
  q.add_argument(
    '--fill-nnx-only',
    choices=('from-target',),
    help="write the --target model's own values for the leaves no source holds (a Dropout's RNG"
    ' stream: a Linen run has none), so plain StandardRestore(nnx.state(abstract_model)) reads'
    ' the result; --target MODULE:FUNCTION then returns the state of a built model'
    ' (nnx.state(Model(nnx.Rngs(0)))), not nnx.eval_shape',
  )
  q.add_argument('--item', default='default', help="the item name under DST (default: 'default')")
  verbose(
    q, "what the convert reads, writes and holds in memory before it starts, and a plan error's problems leaf by leaf"
  )
  q.add_argument(
    '--json',
    action='store_true',
    help='the summary as JSON: written, layout, arrays, bytes, source, source_layout, filled,'
    ' left_out, dropped, skipped',
  )
  q.add_argument(
    '--budget',
    type=_bytes,
    default=None,
    metavar='SIZE',
    help='decoded bytes per batch of arrays (default 32MiB); a larger array is written in blocks of rows',
  )
  q.add_argument(
    '--distributed',
    action='store_true',
    help='run as one of several processes (jax.distributed.initialize; each writes its share)',
  )
  q.add_argument('--coordinator', help='with --distributed: host:port of process 0')
  q.add_argument('--num-processes', type=int, help='with --distributed: how many processes run this convert')
  q.add_argument('--process-id', type=int, help='with --distributed: this process, 0 .. --num-processes - 1')
  quiet(
    q,
    'no progress bars (also off when not a terminal), no count of what rules dropped; what it left out'
    ' of the target, and how to restore it, is still said',
  )

  q = command(
    'compare',
    'compare two checkpoints in any layouts, leaf by leaf; exit 0 only if they match',
    ['ckpts/linen/100 ckpts/nnx/100 --rules rules.py:RULES', 'a b --rtol 1e-6 --json'],
    (EXIT_OK, EXIT_DIFFER, EXIT_USAGE, EXIT_PLAN, EXIT_UNREADABLE, EXIT_RUNTIME),
  )
  source(q, 'a')
  source(q, 'b', help='the checkpoint whose tree A is read as')
  mapping(q)
  q.add_argument('--rtol', type=float, default=0.0, help='relative tolerance (default 0: bit for bit)')
  q.add_argument('--atol', type=float, default=0.0, help='absolute tolerance (default 0)')
  q.add_argument('--budget', type=_bytes, default=None, metavar='SIZE', help='decoded bytes per batch, each side')
  q.add_argument('--json', action='store_true', help='machine-readable output')
  quiet(q, 'the verdict and its counts only: no progress bar, no line per leaf')
  verbose(
    q, "also the leaves that match, each with the A arrays it was read from, and a plan error's problems leaf by leaf"
  )
  return p


@contextlib.contextmanager
def _progress(description: str, total_bytes: int, arrays: int, quiet: bool):
  """A rich progress bar on stderr (bytes, arrays, rate, time left); off when quiet or not a terminal."""
  from rich.console import Console
  from rich import progress as rp

  console = Console(stderr=True)
  columns = (
    rp.TextColumn('{task.description}'),
    rp.BarColumn(),
    rp.DownloadColumn(),
    rp.TextColumn('{task.fields[arrays]}'),
    rp.TransferSpeedColumn(),
    rp.TimeRemainingColumn(),
  )
  with rp.Progress(*columns, console=console, disable=quiet or not console.is_terminal) as bar:
    task = bar.add_task(description, total=total_bytes, arrays=f'0/{arrays} arrays')
    done = [0]

    def advance(nbytes: int, count: int) -> None:
      done[0] += count
      bar.update(task, advance=nbytes, arrays=f'{done[0]}/{arrays} arrays')

    yield advance


def _target(spec: str):
  """(checkpoint, None) for a checkpoint path; (None, abstract state) for module:function."""
  from orbax_linen_nnx.engine import source

  if epath.Path(spec).exists():
    return source.open_checkpoint(_path(spec)), None
  make = _load(spec, '--target')
  if not callable(make):
    return None, make
  try:
    return None, make()
  except TypeError as e:  # a class or function that needs arguments
    raise UsageError(
      f'--target {spec}: calling it with no arguments failed ({e}). --target names a function with no arguments'
      ' that returns the abstract state; write one beside your model, e.g. def abstract(): return'
      ' nnx.state(nnx.eval_shape(lambda: Model(config, rngs=nnx.Rngs(0)))), and pass --target FILE.py:abstract'
    ) from e


def _plan(args, src, rules: Any = None):
  """The plan of SRC into --to or --target, with `rules` where given, else --rules (`prepare.prepare`, as every
  face plans). Returns (the plan, --target's checkpoint or None, --target's abstract state or None)."""
  prepared, tgt, abstract = _prepared(args, src, rules)
  return prepared.plan, tgt, abstract


def _prepared(args, src, rules: Any = None):
  """`_plan`, with the whole `prepare.Prepared` in place of the plan."""
  from orbax_linen_nnx.engine import prepare as prepare_lib

  if args.to:
    # A tree in the other layout with no model: what that layout's training state saves (into Linen: an NNX
    # state written as LinenCompatSave writes it, with the options it takes).
    made = save_options(args, rules) if args.to == 'linen' else restore_options(args, rules)
    return prepare_lib.prepare(src, args.to, made), None, None
  tgt, abstract = _target(args.target)
  return prepare_lib.prepare(src, abstract if tgt is None else tgt, restore_options(args, rules)), tgt, abstract


def save_options(args, rules: Any = None):
  """The `SaveOptions` a command's flags state (`rules`: these instead of --rules'), as `restore_options`; the
  --target of a convert names the tree it writes, which `_plan` reads itself, so it is not loaded here."""
  from orbax_linen_nnx.planning import options as options_lib

  given, stacks = _mapping(args)
  return options_lib.SaveOptions(rules=given if rules is None else rules, stacks=stacks)


def restore_options(args, rules: Any = None):
  """The `RestoreOptions` a command's flags state (`rules`: these instead of --rules'): each option's flag
  is the one its field names (`options.flag_of`), parsed as that flag parses."""
  from orbax_linen_nnx.planning import options as options_lib

  given, stacks = _mapping(args)
  values = {'rules': given if rules is None else rules, 'stacks': stacks}
  for name in options_lib.FIELDS:
    flag = options_lib.flag_of(name)
    value = getattr(args, flag.lstrip('-').replace('-', '_'), None) if flag and name not in values else None
    if value is not None:
      values[name] = value
  return options_lib.RestoreOptions(**values)


def _inspect(args) -> int:
  from orbax_linen_nnx.faces import inspection
  from orbax_linen_nnx.engine import source

  info = inspection.inspect(source.open_checkpoint(args.ckpt))
  detail = 'header' if args.quiet else 'stored' if args.verbose else 'tree'
  print(json.dumps(info, indent=1) if args.json else inspection.render_inspection(info, detail))
  return EXIT_OK


def _plan_command(args) -> int:
  from orbax_linen_nnx.faces import convert
  from orbax_linen_nnx.planning import plans
  from orbax_linen_nnx.engine import prepare as prepare_lib, source

  if args.processes < 1:
    raise UsageError(f'--processes must be at least 1, got {args.processes}')
  src = source.open_checkpoint(args.src)
  if args.suggest_rules:
    return _suggest_rules(args, src)
  prepared, _, _ = _prepared(args, src)
  plan = prepared.plan
  budget = args.budget or convert.DEFAULT_BATCH_BYTES
  # What a convert of it costs each process, too.
  noted, held = convert.with_cost_note(src, plan, budget, args.processes)
  # The convert's cost where asked for (--verbose, --processes, --budget); the plan's own notes always.
  shown = noted if args.verbose or args.processes > 1 or args.budget else plan
  print(json.dumps(shown.as_json(), indent=1) if args.json else str(shown).split('\n', 1)[0] if args.quiet else shown)
  limit = args.host_memory_limit
  problems = []  # a convert's own, beside a restore's (prepare.check_cost)
  if limit is not None and held > limit:
    fits = _fitting_budget(
      src, plan, limit, [limit - (held - budget), limit - convert.largest_chunk_bytes(src, plan)], args.processes
    )
    if fits is not None:
      fix = f'--budget {fits}, or convert on more processes (--processes to cost it)'
    else:  # a stored chunk is decoded whole: below it, no budget fits
      floor = convert.largest_chunk_bytes(src, plan)
      _, least = convert.with_cost_note(src, plan, floor, args.processes)
      fix = (
        f'no --budget fits under it: one stored chunk is {plans.size_text(floor)} and is decoded whole;'
        f' raise --host-memory-limit to at least {plans.size_text(least)} ({least} bytes) with --budget {floor},'
        ' or convert on a machine with that much memory'
      )
    problems.append(
      f'a convert of it holds about {plans.size_text(held)} on the host (budget + stored chunks held'
      f' for several blocks), above --host-memory-limit {plans.size_text(limit)}. Fix: {fix}'
    )
  prepare_lib.check_cost(
    restore_options(args),
    prepared,
    more=problems,
    strict_name='--strict-cost',
    warn=lambda line: print(f'warning: {line}', file=sys.stderr),
  )
  return EXIT_OK


def _fitting_budget(src, plan, limit: int, candidates, processes: int) -> int | None:
  """The first candidate budget whose convert holds at most `limit` (what it holds changes with the budget:
  smaller blocks make more stored chunks feed several of them), or None."""
  from orbax_linen_nnx.faces import convert

  for b in candidates:
    if b >= 1 and convert.with_cost_note(src, plan, b, processes)[1] <= limit:
      return b
  return None


def _suggest_rules(args, src) -> int:
  """The rules module of the renames inferred from SRC and --target."""
  from orbax_linen_nnx.planning import rules as rules_lib

  if args.to:
    raise UsageError('--suggest-rules pairs SRC with a target: give --target (a checkpoint or module:function)')
  # --rules FILE:NAME: those rules first (the renames 'auto' could not settle, say), the rest inferred.
  given, _ = _mapping(args)
  given, _ = rules_lib.split_auto(given)
  plan, _, _ = _plan(args, src, rules=[*rules_lib.as_rules(given, backward=False), rules_lib.AUTO])
  print(rules_lib.as_python(plan.inferred_renames, given), end='')
  return EXIT_OK


def _convert(args) -> int:
  import jax

  if args.distributed:
    host = (args.coordinator or '').rpartition(':')[0]
    jax.distributed.initialize(
      args.coordinator,
      args.num_processes,
      args.process_id,
      # a coordinator on this machine's loopback listens there only
      coordinator_bind_address=args.coordinator if host in ('127.0.0.1', 'localhost') else None,
    )
  from orbax_linen_nnx.faces import convert, inspection
  from orbax_linen_nnx import layout
  from orbax_linen_nnx.planning import plans
  from orbax_linen_nnx.engine import source

  src = source.open_checkpoint(args.src)
  plan, tgt, abstract = _plan(args, src)
  structure = convert.target_structure(tgt) if tgt is not None else None
  filled = {}
  if args.fill_nnx_only:
    if abstract is None or args.distributed:
      raise UsageError(
        '--fill-nnx-only from-target writes the values of a --target MODULE:FUNCTION model, on one'
        ' process: give --target a function returning nnx.state(Model(...)) of a built model'
      )
    filled = convert.target_values(plan.kept, abstract)
    plan = dataclasses.replace(plan, kept=())
  names = None
  if abstract is not None:  # where a model's NNX state stores each leaf
    names = {
      t.path: layout.stored(t.path, bool(t.variable_type)) for t in [r.target for r in plan.reads] + list(filled)
    }
  total = sum(plans.nbytes(r.target.shape, r.target.dtype) for r in plan.reads)
  budget = args.budget or convert.DEFAULT_BATCH_BYTES
  if args.verbose and jax.process_index() == 0:  # asked for, and never before a refusal of the destination
    convert.check_destination(src, epath.Path(args.dst), args.overwrite)
    noted, _ = convert.with_cost_note(src, plan, budget, jax.process_count())
    print(f'  note    {noted.notes[-1]}', file=sys.stderr)
  with _progress('convert', total, len(plan.reads), args.quiet or jax.process_index() != 0) as advance:
    written = convert.convert(
      src,
      args.dst,
      plan,
      structure=structure,
      item=args.item,
      overwrite=args.overwrite,
      batch_bytes=budget,
      on_written=advance,
      names=names,
      extra={t.path: v for t, v in filled.items()},
    )
  if jax.process_index() == 0 and args.json:
    print(
      json.dumps(
        {
          'written': os.fspath(written),
          'layout': plan.target_layout,
          'arrays': len(plan.reads),
          'bytes': total,
          'source': os.fspath(src.directory),
          'source_layout': src.layout,
          'filled': [layout.render(t.path) for t in filled],
          'left_out': [layout.render(t.path) for t in plan.kept],
          'dropped': [x.name for x, _ in plan.dropped],
          'skipped': [x.name for x in plan.skipped],
        },
        indent=1,
      )
    )
  elif jax.process_index() == 0:
    print(
      f'wrote {written} ({plan.target_layout} layout): {len(plan.reads)} arrays,'
      f' {inspection.size_text(total)} from {src.directory} ({src.layout} layout)'
    )
    if (plan.dropped or plan.skipped) and not args.quiet:
      print(
        f'  left out: {len(plan.dropped)} dropped by rules, {len(plan.skipped)} NNX-only arrays skipped'
        ' (the plan command lists them)'
      )
    if plan.kept:  # said even with --quiet: restoring the result needs it
      print(convert.kept_note(plan))
  return EXIT_OK


def _compare(args) -> int:
  from orbax_linen_nnx.faces import compare, convert
  from orbax_linen_nnx.planning import plans
  from orbax_linen_nnx.engine import source

  a, b = source.open_checkpoint(args.a), source.open_checkpoint(args.b)
  rules, stacks = _mapping(args)
  total = sum(plans.nbytes(x.shape, x.dtype) for x in b.arrays)
  with _progress('compare', total, len(b.arrays), args.quiet) as advance:
    result = compare.compare(
      a,
      b,
      rules=rules,
      stacks=stacks,
      rtol=args.rtol,
      atol=args.atol,
      batch_bytes=args.budget or convert.DEFAULT_BATCH_BYTES,
      on_done=advance,
    )
  if args.json:
    print(
      json.dumps(
        {
          'equal': result.equal,
          'compared': result.compared,
          'missing': result.missing,
          'extra': result.extra,
          'differing': result.differing,
          'casts': result.casts,
          **({'pairs': {b: list(a) for b, a in result.pairs}} if args.verbose else {}),
        },
        indent=1,
      )
    )
  else:
    print(f'A {a.directory} ({a.layout})\nB {b.directory} ({b.layout})')
    print(
      f'{result.compared} leaves compared: {result.compared - len(result.differing)} match,'
      f' {len(result.differing)} differ; {len(result.missing)} missing from A, {len(result.extra)} extra in A'
      + (f' (rtol={args.rtol}, atol={args.atol})' if args.rtol or args.atol else ' (bit for bit)')
    )
    shown = [] if args.quiet else result.differing
    if args.verbose:
      differ = {d['path'] for d in result.differing}
      for b_path, a_names in result.pairs:
        if b_path not in differ:
          print(f"  same     {b_path}  <-  {', '.join(a_names)}")
    for d in shown:
      print(
        f"  differs  {d['path']}: {d['elements']} of {d['of']} elements, max abs diff {d['max_abs']:.6g},"
        f" max rel diff {d['max_rel']:.6g}"
      )
    for p in [] if args.quiet else result.missing:
      print(f'  missing  {p} (in B, nothing in A makes it)')
    for p in [] if args.quiet else result.extra:
      print(f'  extra    {p} (in A, nothing in B uses it)')
    for c in [] if args.quiet else result.casts:
      print(f'  cast     {c}')
    print('MATCH' if result.equal else 'DIFFER')
  return EXIT_OK if result.equal else EXIT_DIFFER


def _fix_line(error, args) -> str | None:
  """A `PlanError`'s fixes said as flags and files (the error says them in Python); None keeps its own."""
  if not error.fixes:
    return None
  src, tgt = (args.a, args.b) if args.command == 'compare' else (args.src, getattr(args, 'target', None))
  given = getattr(args, 'rules', None)
  suggest = ' '.join(
    shlex.quote(str(x))
    for x in (
      'orbax-linen-nnx',
      'plan',
      src,
      '--target',
      tgt,
      *(('--rules', given) if given else ()),
      '--suggest-rules',
    )
  )
  said = []
  for fix in error.fixes:
    notes = f" ({'; '.join(fix.notes)})" if fix.notes else ''
    if fix.kind == 'rename' and fix.auto and not given and tgt:
      pairs = ', '.join(f'{k} -> {v}' for k, v in fix.renames.items())
      said.append(
        f'add --rules auto, which pairs {pairs} (to keep them as a file: {suggest} > rules.py, then'
        ' --rules rules.py:RULES)'
      )
    elif fix.kind == 'rename' and fix.rules is not None:
      said.append(
        f'write the renames in a file, rules.py holding RULES = {fix.rules!r}, and pass --rules rules.py:RULES{notes}'
      )
    elif fix.kind == 'rename':
      said.append(
        f'add rename({fix.renames!r}) to the list --rules {given} names (from orbax_linen_nnx import rename){notes}'
      )
    elif fix.kind == 'auto_rename' and fix.renames:
      if given and given != 'auto':
        said.append(
          f"add rename({fix.renames!r}) before 'auto' in the list --rules {given} names"
          f" {' '.join(fix.notes)}; then {suggest} > rules.py writes every rename"
        )
      else:
        said.append(
          f"write rules.py holding `from orbax_linen_nnx import rename` and RULES = [rename({fix.renames!r}),"
          f" 'auto'] {' '.join(fix.notes)}, and pass --rules rules.py:RULES (to plan --suggest-rules too)"
        )
    elif fix.kind == 'auto_rename':
      said.append("state the pairs in a rules file: RULES = [rename({...}), 'auto'] and --rules rules.py:RULES")
    elif fix.kind == 'partial' and args.command == 'plan':
      said.append('add --partial to plan only the leaves that match')
  return f"Fix: {'; or '.join(said)}." if said else ''


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one command; returns the exit status (see the module docstring)."""
  args = _parser().parse_args(argv)
  from orbax_linen_nnx.faces import convert
  from orbax_linen_nnx.planning import plans, rules as rules_lib
  from orbax_linen_nnx.engine import source

  command = {'inspect': _inspect, 'plan': _plan_command, 'convert': _convert, 'compare': _compare}[args.command]
  try:
    return command(args)
  except BrokenPipeError:
    # The reader closed the pipe (`inspect --json | head`): nothing more to say. Python would print a second
    # BrokenPipeError when it flushes stdout at exit; point stdout at /dev/null first (Python's own advice).
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK
  except (UsageError, rules_lib.RuleError) as e:
    status, message = EXIT_USAGE, str(e)
  except plans.PlanError as e:
    status, message = EXIT_PLAN, e.text(_fix_line(e, args), verbose=getattr(args, 'verbose', False), cli=True)
  except (source.CheckpointNotFoundError, source.DamagedCheckpointError, source.UnsupportedStorageError) as e:
    status, message = EXIT_UNREADABLE, str(e)
  except convert.DestinationExistsError as e:
    status, message = EXIT_DESTINATION, str(e)
  except (OSError, ValueError) as e:
    if _runtime_failure(e):
      status, message = EXIT_RUNTIME, f'the run failed in storage or at run time, not on the command line: {e}.'
      message += (
        ' Nothing finished was left at the destination: fix the cause (space, permissions, network) and'
        ' run the same command again'
        if args.command == 'convert'
        else ''
      )
    else:  # e.g. a checkpoint already in the layout asked for, several items in a step
      status, message = EXIT_USAGE, str(e)
  print(f'orbax-linen-nnx {args.command}: error: {message}', file=sys.stderr)
  return status


if __name__ == '__main__':
  sys.exit(main())
