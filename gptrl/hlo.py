"""What one compiled program does per step, read from its optimised HLO text (`compiled.as_text()`).

XLA's own `cost_analysis()` counts a while loop's body once, whatever its trip count, so a train step that
accumulates gradients over A micro-batches in a `lax.scan`, or a sampler that decodes N tokens in a
`fori_loop`, reports the flops of one micro-batch or one token. This module reads the program instead: every
computation's execution count (a while loop's body and condition run its trip count times, read from the loop's
condition), then per execution

  - the matmul flops of every `dot` and `convolution` (XLA's own counting rule: 2 x multiply-adds over the valid
    window positions, as HloCostAnalysis does it; on TPU einsums are compiled to convolutions);
  - the collectives (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute, sync or async):
    how many run per step and the bytes of the larger of their operand and result, per device;
  - the bytes the top-level instructions read and write in device memory (fusions, copies, collectives...:
    operands + results, not what happens inside a fusion; not the arrays XLA's TPU compiler places in on-chip
    VMEM, whose prefetches read device memory once), for a memory-bandwidth bound;
  - the work of the splash-attention kernels (gptrl/splash.py), which XLA sees as opaque custom calls: their
    matmul flops and bytes by `splash_kernel`'s model of the kernel (causal masks: the only ones gptrl builds).

With every trip count taken as 1 (`loops=False`) the matmul flops are what `cost_analysis()["flops"]` reports,
less its elementwise flops (tests/test_hlo.py checks this against XLA on CPU and TPU programs).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_ITEM_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\](\{[^{}]*\})?")
_SPACE = re.compile(r"S\((\d+)\)")  # a layout's memory space: none (0) is device memory; on TPU 1 is on-chip VMEM
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CLOSE = re.compile(r'\}(, execution_thread="[^"]*")?')  # a computation's closing line
_CALLEES = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
# Instructions that move no data of their own (views, tuples, control flow, bookkeeping).
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "custom-call", "async-done",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done", "send-done",
               "recv-done"}


@dataclasses.dataclass(frozen=True)
class Array:
  dtype: str
  dims: tuple[int, ...]
  space: int = 0  # memory space (the layout's S(n)): 0 is device memory (HBM), others are on-chip or host

  @property
  def hbm_bytes(self) -> float:
    """Its bytes where it lives in device memory; 0 for an array in another memory space."""
    return self.bytes if self.space == 0 else 0.0

  @property
  def bytes(self) -> float:
    return math.prod(self.dims) * _ITEM_BYTES.get(self.dtype, 1)


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  result: list[Array]  # the arrays of its result (several for a tuple)
  operands: list[str]  # operand instruction names
  inline_operands: list[list[Array]]  # operand types when the text spells them out (CPU/GPU HLO)
  attrs: str
  literal: int | None = None  # the value of an integer scalar constant
  parameter: int | None = None  # a parameter's number


@dataclasses.dataclass
class Computation:
  name: str
  entry: bool
  instructions: list[Instruction]

  @functools.cached_property
  def defs(self) -> dict[str, Instruction]:
    """Its instructions by name (built once: the computations are complete when parsed)."""
    return {i.name: i for i in self.instructions}

  @functools.cached_property
  def users(self) -> dict[str, list[Instruction]]:
    """The instructions that use each instruction's value, by its name (built once)."""
    found: dict[str, list[Instruction]] = collections.defaultdict(list)
    for inst in self.instructions:
      for name in inst.operands:
        found[name].append(inst)
    return found


def arrays(type_text: str) -> list[Array]:
  """The arrays named in an HLO type (`bf16[8,128]{1,0}` or a tuple of them)."""
  found = []
  for m in _ARRAY.finditer(type_text):
    space = _SPACE.search(m.group(3) or "")
    dims = tuple(int(d) for d in m.group(2).split(",") if d)
    found.append(Array(m.group(1), dims, int(space.group(1)) if space else 0))
  return found


def _matching(text: str, start: int) -> int:
  """Index just past the bracket closing the one at text[start]."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  depth, stack = 0, []
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      stack.append(pairs[c])
      depth += 1
    elif stack and c == stack[-1]:
      stack.pop()
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


def _split_top(text: str) -> list[str]:
  """`text` split at the commas outside brackets."""
  parts, depth, current = [], 0, []
  for c in text:
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    if c == "," and depth == 0:
      parts.append("".join(current))
      current = []
    else:
      current.append(c)
  if "".join(current).strip():
    parts.append("".join(current))
  return parts


def _parse_instruction(line: str) -> Instruction | None:
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  name, rest = m.group(1), m.group(2).strip()
  if rest.startswith("("):
    end = _matching(rest, 0)
  else:
    end = rest.find(" ")
    end = len(rest) if end < 0 else end
  type_text, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  close = _matching(rest, op.end() - 1)
  operand_text, attrs = rest[op.end():close - 1], rest[close:]
  operands, inline = [], []
  for part in _split_top(operand_text):
    names = re.findall(r"%([\w.\-]+)", part)
    if names:
      operands.append(names[-1])
      inline.append(arrays(part[:part.rfind("%")]))
  result = arrays(type_text)
  literal = None
  if op.group(1) == "constant" and len(result) == 1 and not result[0].dims and result[0].dtype[0] in "su":
    literal = int(operand_text) if re.fullmatch(r"-?\d+", operand_text.strip()) else None
  number = int(operand_text) if op.group(1) == "parameter" and operand_text.strip().isdigit() else None
  return Instruction(name, op.group(1), result, operands, inline, attrs, literal, number)


def parse(text: str) -> dict[str, Computation]:
  """The computations of an HLO module's text, by name (in the order the text defines them)."""
  computations: dict[str, Computation] = {}
  current: Computation | None = None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and not line.startswith(" ") and "=" not in line.split("(")[0]:
        current = Computation(m.group(2), bool(m.group(1)), [])
      continue
    if _CLOSE.fullmatch(line.rstrip()):  # (not "}}, metadata=...": the end of an attribute spread over lines,
      computations[current.name] = current  # as Pallas kernels' frontend_attributes are)
      current = None
      continue
    inst = _parse_instruction(line)
    if inst is not None:
      current.instructions.append(inst)
  return computations


def _trip_count(while_inst: Instruction, caller: Computation, computations: dict[str, Computation]) -> int | None:
  """How many times a while loop runs: XLA's `known_trip_count` when the backend records it, else from the
  condition `i < K` (or `<=`) on a tuple element whose initial value is a constant in the caller."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', while_inst.attrs)
  if known:
    return int(known.group(1))
  cond_name = re.search(r"\bcondition=%?([\w.\-]+)", while_inst.attrs)
  cond = computations.get(cond_name.group(1)) if cond_name else None
  if cond is None or not cond.instructions:
    return None
  root = cond.instructions[-1]
  if root.opcode != "compare" or len(root.operands) != 2:
    return None
  direction = re.search(r"direction=(\w+)", root.attrs)
  direction = direction.group(1) if direction else ""
  a, b = (cond.defs.get(n) for n in root.operands)
  limit_side = 1 if b is not None and b.literal is not None else 0
  counter, limit = (a, b) if limit_side == 1 else (b, a)
  if limit is None or limit.literal is None or counter is None:
    return None
  bound = limit.literal
  if direction in ("GT", "GE"):  # `K > i`: the limit on the left
    direction = {"GT": "LT", "GE": "LE"}[direction] if limit_side == 0 else direction
  start, step = 0, 1
  index = re.search(r"index=(\d+)", counter.attrs) if counter.opcode == "get-tuple-element" else None
  if index and while_inst.operands:
    i = int(index.group(1))
    init = caller.defs.get(while_inst.operands[0])
    if init is not None and init.opcode == "tuple" and i < len(init.operands):
      start = _resolve_constant(caller, init.operands[i]) or 0
    body_name = re.search(r"\bbody=%?([\w.\-]+)", while_inst.attrs)
    body = computations.get(body_name.group(1)) if body_name else None
    if body is not None and body.instructions and body.instructions[-1].opcode == "tuple":
      root = body.instructions[-1]
      update = body.defs.get(root.operands[i]) if i < len(root.operands) else None
      if update is not None and update.opcode == "add":
        steps = [_resolve_constant(body, o) for o in update.operands]
        step = next((k for k in steps if k), 1)
  if step <= 0:
    return None
  if direction == "LT":
    return max(-(-(bound - start) // step), 0)
  if direction == "LE":
    return max((bound - start) // step + 1, 0)
  return None


def _resolve_constant(comp: Computation, name: str) -> int | None:
  """The integer constant `name` is, through copies, bitcasts and conversions; None if it is not one."""
  for _ in range(8):
    inst = comp.defs.get(name)
    if inst is None:
      return None
    if inst.literal is not None:
      return inst.literal
    if inst.opcode not in ("copy", "bitcast", "convert", "reshape") or not inst.operands:
      return None
    name = inst.operands[0]
  return None


def execution_counts(computations: dict[str, Computation],
                     loops: bool = True) -> tuple[dict[str, float], list[str]]:
  """(times each computation runs per call of the entry computation, loops whose trip count is unknown: taken
  as 1). With `loops=False` every loop counts once, as XLA's cost analysis does."""
  callees: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
  unknown = []
  for comp in computations.values():
    for inst in comp.instructions:
      factor = 1.0
      if inst.opcode == "while" and loops:
        trips = _trip_count(inst, comp, computations)
        if trips is None:
          unknown.append(f"{comp.name}/{inst.name}")
        factor = float(trips if trips is not None else 1)
      names = [m.group(2) for m in _CALLEES.finditer(inst.attrs)]
      for m in _BRANCHES.finditer(inst.attrs):
        names += [n.strip().lstrip("%") for n in m.group(1).split(",") if n.strip()]
      for name in names:
        if name in computations:
          callees[comp.name].append((name, factor))
  counts: dict[str, float] = collections.defaultdict(float)
  order = _topological(computations, callees)
  for name in order:
    if computations[name].entry:
      counts[name] += 1.0
  for name in order:
    for callee, factor in callees[name]:
      counts[callee] += counts[name] * factor
  return dict(counts), unknown


def _topological(computations: dict[str, Computation], callees: dict[str, list[tuple[str, float]]]) -> list[str]:
  """Callers before callees."""
  incoming = collections.Counter(c for edges in callees.values() for c, _ in edges)
  ready = [n for n in computations if incoming[n] == 0]
  order = []
  while ready:
    name = ready.pop()
    order.append(name)
    for callee, _ in callees[name]:
      incoming[callee] -= 1
      if incoming[callee] == 0:
        ready.append(callee)
  return order


def _operand_arrays(inst: Instruction, defs: dict[str, Instruction], k: int) -> list[Array]:
  if k < len(inst.inline_operands) and inst.inline_operands[k]:
    return inst.inline_operands[k]
  d = defs.get(inst.operands[k]) if k < len(inst.operands) else None
  return d.result if d is not None else []


def _dims(attrs: str, key: str) -> list[int]:
  m = re.search(key + r"=\{([\d,]*)\}", attrs)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def dot_flops(inst: Instruction, defs: dict[str, Instruction]) -> float:
  """2 x output elements x the contracted size (XLA's rule for `dot`)."""
  lhs = _operand_arrays(inst, defs, 0)
  if not lhs or not inst.result:
    return 0.0
  contracted = math.prod(lhs[0].dims[d] for d in _dims(inst.attrs, "lhs_contracting_dims"))
  return 2.0 * math.prod(inst.result[0].dims) * contracted


def _window(attrs: str) -> dict[str, list[list[int]]]:
  m = re.search(r"window=\{([^}]*)\}", attrs)
  out: dict[str, list[list[int]]] = {}
  if not m:
    return out
  for item in m.group(1).split():
    key, _, value = item.partition("=")
    out[key] = [[int(x) for x in part.split("_")] for part in value.split("x")]
  return out


def _valid_positions(in_size: int, kernel: int, out_size: int, stride: int, pad_low: int, base_dilation: int,
                     window_dilation: int) -> int:
  """Pairs (output position, kernel position) that read a real (not padding, not dilation-hole) input element."""
  o = np.arange(out_size, dtype=np.int64)[:, None]
  k = np.arange(kernel, dtype=np.int64)[None, :]
  undilated = o * stride - pad_low + k * window_dilation
  ok = (undilated % base_dilation == 0) & (undilated >= 0) & (undilated // base_dilation < in_size)
  return int(np.count_nonzero(ok))


def convolution_flops(inst: Instruction, defs: dict[str, Instruction]) -> float:
  """2 x (input features / feature groups) x output features x (batch / batch groups) x valid window positions
  (HloCostAnalysis's rule for `convolution`)."""
  lhs, rhs = _operand_arrays(inst, defs, 0), _operand_arrays(inst, defs, 1)
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs)
  if not lhs or not rhs or not labels or not inst.result:
    return 0.0
  lhs_dims, rhs_dims, out_dims = lhs[0].dims, rhs[0].dims, inst.result[0].dims
  lhs_l, rhs_l, out_l = labels.groups()
  window = _window(inst.attrs)
  groups = re.search(r"feature_group_count=(\d+)", inst.attrs)
  batch_groups = re.search(r"batch_group_count=(\d+)", inst.attrs)
  positions = 1
  for d in range(sum(c.isdigit() for c in lhs_l)):
    get = lambda key, default, d=d: window[key][d][0] if key in window else default
    pad_low = window["pad"][d][0] if "pad" in window else 0
    positions *= _valid_positions(lhs_dims[lhs_l.index(str(d))], rhs_dims[rhs_l.index(str(d))],
                                  out_dims[out_l.index(str(d))], get("stride", 1), pad_low, get("lhs_dilate", 1),
                                  get("rhs_dilate", 1))
  fma = ((lhs_dims[lhs_l.index("f")] // (int(groups.group(1)) if groups else 1)) * rhs_dims[rhs_l.index("o")]
         * (lhs_dims[lhs_l.index("b")] // (int(batch_groups.group(1)) if batch_groups else 1)) * positions)
  return 2.0 * fma


_SPLASH = re.compile(r"splash_(mha|mqa)_(fwd|dq|dkv)")
# Matmuls per (query tile, key tile) pair: forward q k^T, p v; dq: q k^T again, do v^T, ds k; dkv: q k^T,
# p^T do, do v^T, ds^T q.
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def splash_kernel(inst: Instruction, defs: dict[str, Instruction]) -> tuple[float, float] | None:
  """(matmul flops, device-memory bytes) of one splash-attention kernel call. Its operands include the
  queries [B, H, T, K], keys and values [B, G, S, K] (the first three floating-point operands of rank 4, or of
  rank 3 where one row per device leaves no batch axis) and its tile tables ([heads, T / bq, S / bkv] int8, the
  first 3-D int8 operand). Under a causal mask with square tiles the kernel visits the n (n + 1) / 2 tiles on and
  below the diagonal (n = T / bq), each for every query head and row, so: flops = 2 bq bkv K x matmuls per tile x
  tiles x B H; bytes: its operands and results once, plus what it reads again per tile: the keys and values for
  every query tile below them (forward, dq), the queries and their output gradient for every key tile above them
  (dkv): (n + 1) / 2 reads in all. None where the operands are not as described."""
  phase = _SPLASH.match(inst.name).group(2)
  operands = [_operand_arrays(inst, defs, k) for k in range(len(inst.operands))]
  floats = [a[0] for a in operands if len(a) == 1 and a[0].dtype[0] in "fb" and len(a[0].dims) in (3, 4)]
  tiles = [a[0] for a in operands if len(a) == 1 and len(a[0].dims) == 3 and a[0].dtype == "s8"]
  if len(floats) < 3 or not tiles or len({len(a.dims) for a in floats[:3]}) != 1:
    return None
  queries, keys, values = floats[:3]
  *rows, h, t, k = queries.dims
  b = rows[0] if rows else 1
  n = tiles[0].dims[-1]
  pairs = n * (n + 1) / 2
  tile_area = (t / n) * (keys.dims[-2] / n)
  flops = 2.0 * tile_area * k * _SPLASH_MATMULS[phase] * pairs * b * h
  moved = sum(a.bytes for arrs in operands for a in arrs) + sum(a.bytes for a in inst.result)
  reread = 2 * queries.bytes if phase == "dkv" else keys.bytes + values.bytes
  moved += ((n + 1) / 2 - 1) * reread
  return flops, moved


@dataclasses.dataclass
class Collective:
  count: float = 0.0  # executions per step
  bytes: float = 0.0  # per device, summed over executions


@dataclasses.dataclass
class Profile:
  """Per call of the program, per device."""
  matmul_flops: float
  bytes_accessed: float
  collectives: dict[str, Collective]
  unknown_loops: list[str]  # loops whose trip count could not be read (counted once); splash kernels not read

  @property
  def collective_bytes(self) -> float:
    return sum(c.bytes for c in self.collectives.values())


def _kind(opcode: str) -> str | None:
  base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  return base if base in COLLECTIVES else None


def profile(text: str, loops: bool = True) -> Profile:
  """Matmul flops, top-level bytes and collectives of one call of the HLO module `text`."""
  computations = parse(text)
  counts, unknown = execution_counts(computations, loops=loops)
  fused = {m.group(2) for comp in computations.values() for inst in comp.instructions if inst.opcode == "fusion"
           for m in _CALLEES.finditer(inst.attrs) if m.group(1) == "calls"}
  flops, traffic = 0.0, 0.0
  collectives = {k: Collective() for k in COLLECTIVES}
  for comp in computations.values():
    n = counts.get(comp.name, 0.0)
    if not n:
      continue
    defs = comp.defs
    for inst in comp.instructions:
      if inst.opcode == "dot":
        flops += n * dot_flops(inst, defs)
      elif inst.opcode == "convolution":
        flops += n * convolution_flops(inst, defs)
      elif inst.opcode == "custom-call" and _SPLASH.match(inst.name):
        kernel = splash_kernel(inst, defs)
        if kernel is None:  # not counted: said, as an unread loop is
          unknown.append(f"{comp.name}/{inst.name} (splash kernel operands not recognised)")
        else:
          flops += n * kernel[0]
          traffic += n * kernel[1]
      kind = _kind(inst.opcode)
      if kind:
        operand_bytes = [a.bytes for k in range(len(inst.operands)) for a in _operand_arrays(inst, defs, k)]
        largest = max([a.bytes for a in inst.result] + operand_bytes + [0.0])
        collectives[kind].count += n
        collectives[kind].bytes += n * largest
      if comp.name not in fused:
        traffic += n * _traffic(inst, defs, computations)
  return Profile(flops, traffic, collectives, unknown)


def _traffic(inst: Instruction, defs: dict[str, Instruction], computations: dict[str, Computation]) -> float:
  """Bytes a top-level instruction reads and writes in device memory: its operands and results, except where
  only part of a buffer moves (a slice reads what it returns; an in-place dynamic-update-slice writes its
  update, not the whole buffer), for the second half of async pairs (counted at their start), and for arrays in
  another memory space: on TPU, XLA prefetches operands into on-chip VMEM (a copy-start or slice-start whose
  destination's layout says S(1)) and keeps some results there; the prefetch reads device memory once and its
  consumer reads VMEM."""
  op = inst.opcode
  if op in _NO_TRAFFIC or op.endswith("-done"):
    return 0.0
  operands = [a for k in range(len(inst.operands)) for a in _operand_arrays(inst, defs, k)]
  results = [a for a in inst.result if a.dims]
  if op in ("slice", "dynamic-slice", "slice-start"):  # the slice is read from its source, written to its result
    ends = results[:2] if op == "slice-start" else operands[:1] + results[:1]  # slice-start: (source, result, ...)
    return min((a.bytes for a in results), default=0.0) * sum(a.space == 0 for a in ends)
  if op == "copy-start":  # (source, destination, context): each moves once
    return sum(a.hbm_bytes for a in results[:2])
  total = sum(a.hbm_bytes for a in operands) + sum(a.hbm_bytes for a in inst.result)
  # In a fusion, an operand that is only sliced or gathered from is read where the slices are (as XLA's own
  # cost analysis counts it), and a buffer that a dynamic-update-slice updates in place, or that a multi-output
  # fusion passes through, is neither read nor written whole.
  if op == "fusion":
    callee = re.search(r"\bcalls=%?([\w.\-]+)", inst.attrs)
    body = computations.get(callee.group(1)) if callee else None
    if body is not None and body.instructions:
      for param in body.instructions:
        if param.parameter is None or param.parameter >= len(inst.operands):
          continue
        whole = sum(a.hbm_bytes for a in _operand_arrays(inst, defs, param.parameter))
        read = _sliced_bytes(param, body)
        if whole and read is not None and read < whole:
          total -= whole - read
      inner = body.defs
      root = body.instructions[-1]
      outputs = [inner.get(n) for n in root.operands] if root.opcode == "tuple" else [root]
      for out in outputs:
        if out is not None and out.opcode == "parameter" and root.opcode == "tuple":  # passed through, aliased
          total -= 2.0 * sum(a.hbm_bytes for a in out.result)
        elif out is not None and out.opcode == "dynamic-update-slice" and len(out.operands) > 1:
          buffer = sum(a.hbm_bytes for a in out.result)
          update = sum(a.bytes for a in (inner[out.operands[1]].result if out.operands[1] in inner else []))
          total -= 2.0 * buffer - 2.0 * update if buffer else 0.0
  return max(total, 0.0)


def _sliced_bytes(param: Instruction, body: Computation) -> float | None:
  """The bytes a fused computation reads of its parameter `param` when every use of it (through views) is a
  slice, dynamic slice or gather: the bytes those return; None when some use reads it whole."""
  users = body.users
  read, frontier = 0.0, [param]
  while frontier:
    value = frontier.pop()
    for user in users.get(value.name, []):
      if user.opcode in ("bitcast", "reshape"):
        frontier.append(user)
      elif user.opcode in ("slice", "dynamic-slice", "gather") and user.operands[0] == value.name:
        read += sum(a.bytes for a in user.result)
      else:
        return None
  return read if users.get(param.name) else None


def summarise(collectives: dict[str, Collective]) -> str:
  """'all-gather 24 x, 1.2 GiB; ...' for the kinds that occur."""
  parts = [f"{k} {c.count:.0f}x {c.bytes / 2**30:.2f} GiB" for k, c in collectives.items() if c.count]
  return "; ".join(parts) or "none"
