"""Which example each element of each tensor comes from, followed through one forward pass.

While the model and the loss run, a ``TorchDispatchMode`` gives every tensor an operation
produces a *tag*: for each element, the example whose inputs it was computed from, ``NONE``
(no example: parameters, constants) or ``MIXED`` (several, or unknown). Tags over-approximate
the flow of values: if a value flows into another, the other's tag includes the first's. So
when example ``c``'s loss is tagged ``c`` (or ``NONE``), a row of a layer's output tagged
``b`` reaches no loss but ``ℓ_b``, and its part of the layer's gradient belongs to ``g_b``,
whatever moved it (flattening tokens, routing them to experts, sorting the batch) on the way.

A tag is either an :class:`Axis` (the example is a digit of the index along one dimension:
the batch as the model received it, or flattened into tokens or windows, known without
looking at any data) or a *table*: an ``int64`` CPU tensor broadcastable to the value (right
aligned), for data-dependent moves such as routing or sorting. An operation pergrad does not
know gives its outputs the union of its inputs' tags over every element: ``NONE`` where no
input comes from an example, one example where all that do come from it alone (nothing else
can flow in), else ``MIXED``, said in :attr:`Provenance.unknown`.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode,
    _pop_mode_temporarily,
)

from pergrad import randomness

NONE = -1
"""Tag of an element computed from no example's inputs."""
MIXED = -2
"""Tag of an element that may come from several examples."""

_BIG = 1 << 62
_NOTHING = torch.tensor(NONE)
_ALL = torch.tensor(MIXED)
aten = torch.ops.aten


@dataclass(frozen=True)
class Axis:
    """Element ``i`` along dimension ``dim`` (negative: counted from the right) belongs to
    example ``(i // stride) % size``, whatever its other indices; that dimension's length is a
    multiple of ``stride · size``."""

    dim: int
    stride: int
    size: int

    def table(self, length: int) -> Tensor:
        ids = torch.arange(length) // self.stride % self.size
        return ids.view(length, *[1] * (-self.dim - 1))


Tag = Axis | Tensor


def batch(ndim: int, size: int) -> Axis:
    """The tag of a model input: example ``i`` is row ``i``."""
    return Axis(-ndim, 1, size)


def table(tag: Tag, shape: tuple[int, ...]) -> Tensor:
    """The tag as a table broadcastable to ``shape``."""
    if isinstance(tag, Axis):
        return tag.table(shape[tag.dim])
    return tag


def merge(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise union of two tables (broadcast)."""
    same = a == b
    return torch.where(same, a, torch.where(a == NONE, b, torch.where(b == NONE, a, MIXED)))


def reduce(tag: Tag, shape: tuple[int, ...], dims, keepdim: bool = True) -> Tag:
    """The union of the tag over ``dims`` of a value of ``shape``, as for a reduction."""
    ndim = len(shape)
    dims = sorted({d % ndim for d in dims}) if ndim else []
    if tag is _NOTHING or tag is _ALL:
        return tag
    if isinstance(tag, Axis):
        axis = tag.dim % ndim
        if axis in dims:
            ids = shape[axis] // tag.stride
            if min(ids, tag.size) <= 1:  # one example along it
                tag = tag.table(shape[axis])
            else:
                return _ALL
        elif keepdim:
            return tag
        else:
            return Axis(tag.dim + sum(d > axis for d in dims), tag.stride, tag.size)
    t = _pad(tag, ndim)
    over = [d for d in dims if t.shape[d] > 1]
    if over:
        mixed = (t == MIXED).to(torch.int64).amax(over, keepdim=True)
        low = torch.where(t >= 0, t, _BIG).amin(over, keepdim=True)
        high = t.amax(over, keepdim=True)
        one = torch.where(low == high, high, MIXED)
        t = torch.where(mixed > 0, MIXED, torch.where(high < 0, NONE, one))
    if not keepdim and dims:
        t = t.squeeze(dims)
    return _compact(t)


def single(tag: Tag, shape: tuple[int, ...]) -> int:
    """The union of the tag over the whole value: an example, ``NONE`` or ``MIXED``."""
    if not shape:
        return int(tag) if isinstance(tag, Tensor) else MIXED
    return int(reduce(tag, shape, range(len(shape)), keepdim=False))


def _pad(t: Tensor, ndim: int) -> Tensor:
    """A table with ``ndim`` dimensions (size-1 ones added on the left)."""
    return t.view(*[1] * (ndim - t.dim()), *t.shape) if t.dim() < ndim else t


def _compact(t: Tensor) -> Tensor:
    """A table with no dimension to spare: a scalar where every element has one tag, length 1
    along every dimension its tags do not vary along."""
    if t.numel() == 1 or bool((t == t.reshape(-1)[0]).all()):
        value = int(t.reshape(-1)[0])
        return _NOTHING if value == NONE else _ALL if value == MIXED else torch.tensor(value)
    for d in range(t.dim()):  # a dimension along which every tag repeats: length 1
        if t.shape[d] > 1 and (t.stride(d) == 0 or bool((t == t.narrow(d, 0, 1)).all())):
            t = t.narrow(d, 0, 1)
    return t


def _full(tag: Tag, shape) -> Tensor:
    """The table expanded to ``shape`` (a view, no copy)."""
    return _pad(table(tag, shape), len(shape)).expand(shape)


def reshaped(tag: Tag, before: tuple[int, ...], after: tuple[int, ...]) -> Tag:
    """The tag of a value of shape ``before`` viewed as ``after`` (same elements in order)."""
    if isinstance(tag, Axis) and before:
        d = tag.dim % len(before)
        place = math.prod(before[d + 1 :]) * tag.stride  # the example's digit, in elements
        inner = 1
        for e in range(len(after) - 1, -1, -1):
            length = after[e]
            if inner <= place < inner * length or (length == 1 and place == inner):
                stride = place // inner
                if place % inner == 0 and length % (stride * tag.size) == 0:
                    return Axis(e - len(after), stride, tag.size)
                break
            inner *= length
    if isinstance(tag, Tensor) and tag.dim() == 0:
        return tag
    return _compact(_full(tag, before).reshape(after))


def unmarked(tag: Tag) -> bool:
    """Whether every element of a value with this tag comes from no example."""
    return isinstance(tag, Tensor) and tag.dim() == 0 and int(tag) == NONE


def in_order(tag: Tag, shape: tuple[int, ...], size: int) -> bool:
    """Whether a value's rows are the batch as the model received it (row ``b`` example
    ``b``), or it comes from no example."""
    if isinstance(tag, Axis):
        return tag == Axis(-len(shape), 1, size) and shape[0] == size
    if unmarked(tag):
        return True
    if tag.dim() == 0:  # one example throughout
        return size == 1 and int(tag) == 0 and bool(shape) and shape[0] == 1
    if not shape or shape[0] != size or tag.dim() != len(shape) or tag.shape[0] != size:
        return False
    ids = rows(tag, shape, len(shape) - 1)
    return ids is not None and torch.equal(ids, torch.arange(size))


def grouped(tag: Tag, shape: tuple[int, ...], rows: int) -> bool:
    """Whether a value's dim 0 holds each example's ``rows`` rows together, examples in
    order (``(B·heads, L, S)``: example ``b``'s heads are the rows from ``b·heads`` on)."""
    size = shape[0] // rows
    if isinstance(tag, Axis):
        return tag == Axis(-len(shape), rows, size)
    ids = along(tag, shape, 0)
    return ids is not None and torch.equal(ids, torch.arange(size).repeat_interleave(rows))


def example_dim(tag: Tag, shape: tuple[int, ...]) -> int:
    """The dimension along which a value's examples vary (0 where none does); ``-1`` where
    they vary along several."""
    if isinstance(tag, Axis):
        return tag.dim % len(shape)
    varying = [d for d, n in enumerate(_pad(tag, len(shape)).shape) if n > 1]
    return varying[0] if len(varying) == 1 else 0 if not varying else -1


def moved_to_front(tag: Tag, shape: tuple[int, ...], dim: int) -> Tag:
    """The tag of ``value.movedim(dim, 0)``."""
    if dim == 0:
        return tag
    if isinstance(tag, Axis):
        axis = tag.dim % len(shape)
        moved = 0 if axis == dim else axis + 1 if axis < dim else axis
        return Axis(moved - len(shape), tag.stride, tag.size)
    return _compact(_pad(tag, len(shape)).movedim(dim, 0)) if tag.dim() else tag


def along(tag: Tag, shape: tuple[int, ...], dim: int) -> Tensor | None:
    """The example of each index along ``dim`` of a value of ``shape``, ``(shape[dim],)``;
    ``None`` where an index holds several examples, or none."""
    others = [d for d in range(len(shape)) if d != dim]
    ids = _full(reduce(tag, shape, others, keepdim=False), (shape[dim],)).reshape(-1)
    return ids if bool((ids >= 0).all()) else None


def rows(tag: Tag, shape: tuple[int, ...], features: int) -> Tensor | None:
    """The example of each position of a value of ``shape`` whose last ``features``
    dimensions are features, flattened: ``(positions,)``; ``None`` where a position's
    features do not all come from the same single example."""
    leading = shape[: len(shape) - features]
    t = reduce(tag, shape, range(len(leading), len(shape)), keepdim=False)
    ids = _full(t, leading).reshape(-1)
    return ids if bool((ids >= 0).all()) else None


class Provenance(TorchDispatchMode):
    """Tags every tensor the operations run under it produce. Enter it around the forward
    pass and the loss; tag the model's inputs with :meth:`set` first."""

    def __init__(self):
        super().__init__()
        self.mixing: list[str] = []  # operations that combined several examples
        self.unknown: list[str] = []  # operations pergrad does not follow
        self.random: list[str] = []  # operations that drew random numbers
        self.before: tuple = ()  # the layout of a tensor whose layout an operation changes
        self._tags: dict[int, tuple] = {}  # id(tensor) -> (weak reference, tag, writes seen)
        self._pointers: dict[int, tuple] = {}  # id(indices) -> (weak reference, tag)
        self._pointing = False  # whether tag() reads indices' pointer tags
        self._writes = 0  # changes in place that changed a tag, so far
        self._changed: dict[int, int] = {}  # storage -> the count at its last such change
        self._memory: dict[int, tuple] = {}  # storage -> (count, tag) per element, element size
        self._lost = False  # a change in place that could not be followed: nothing is known

    # tags on tensors ------------------------------------------------------------------------

    def tag(self, x: Tensor) -> Tag:
        """The tag of ``x``; ``NONE`` for tensors this pass did not produce. A tensor whose
        storage changed in place since it was tagged (through an alias, ``.data``) is
        ``MIXED``."""
        if self._lost:
            return _ALL
        if self._pointing and (found := self._pointers.get(id(x))) and found[0]() is x:
            return found[1]
        found = self._tags.get(id(x))
        alive = found is not None and found[0]() is x
        if self._changed:
            key = _storage(x)
            last = self._writes if key == -1 else self._changed.get(key, 0)
            if last and (not alive or found[2] < last):
                return self._refreshed(x, last)
        return found[1] if alive else _NOTHING

    def _refreshed(self, x: Tensor, last: int) -> Tag:
        """The tag of a tensor whose memory changed since it was tagged (through a view, a
        chunk, ``.data``): the tags written since at its elements, its own elsewhere."""
        written = self._memory.get(_storage(x))
        entry = self._tags.get(id(x))
        alive = entry is not None and entry[0]() is x
        if written is None or written[2] != x.element_size() or x.layout != torch.strided:
            return self._untraceable()
        counts, tags = written[0], written[1]
        where = _positions(x)
        own = _full(entry[1], tuple(x.shape)) if alive else _full(_NOTHING, tuple(x.shape))
        newer = counts[where] > (entry[2] if alive else 0)
        tag = _compact(torch.where(newer, tags[where], own))
        self.set(x, tag)
        return tag

    def call(self, func, args: tuple, kwargs: dict):
        """``func(*args, **kwargs)``, where the recurrent kernels ``torch.rnn_tanh``,
        ``rnn_relu``, ``gru`` and ``lstm`` (which decompose into some twenty operations per
        step) run whole, out of this mode's sight, their outputs and final states tagged by
        sequence (:func:`_sequences`): the tags their steps would give, or wider, at the cost
        of one operation. For a ``TorchFunctionMode`` active inside this one."""
        if func is torch._pad_packed_sequence and not kwargs and len(args) == 5:
            return self._padded(func(*args), args)
        followed = func in _RECURRENT and not kwargs and len(args) == 9
        if not followed or _get_current_dispatch_mode() is not self or args[0].dim() < 2:
            return func(*args, **kwargs)
        with self.paused():
            out = func(*args)
        packed = isinstance(args[1], Tensor) and not args[1].is_floating_point()
        hx, weights = (args[2], args[3]) if packed else (args[1], args[2])
        states = [(h, 1) for h in ((hx,) if isinstance(hx, Tensor) else hx)]
        if packed:
            rows = torch.cat([torch.arange(n) for n in args[1].tolist()])
            sequences = _sequences(self, args[0], 0, states, weights, rows)
            self.set(out[0], _compact(sequences[rows].view(-1, 1)))
        else:
            batch_first = args[8]
            sequences = _sequences(self, args[0], 0 if batch_first else 1, states, weights)
            self.set(out[0], _compact(sequences.view((-1, 1, 1) if batch_first else (1, -1, 1))))
        for state in out[1:]:
            self.set(state, _compact(sequences.view(1, -1, 1)))
        return out

    def _padded(self, out: tuple, args: tuple) -> tuple:
        """Packed sequences padded back: padded to the batch's longest sequence (no
        ``total_length``, or one equal to it), a shorter sequence's padding exists because of
        the other examples' lengths: it counts as theirs (``MIXED``), and where it reaches a
        loss, pergrad cannot tell (a ``total_length`` longer than every sequence can)."""
        padded, lengths = out
        batch_sizes, batch_first, length = args[1], args[2], args[4]
        if length != len(batch_sizes) or bool((lengths == length).all()):
            return out
        steps = torch.arange(length)
        after = steps.unsqueeze(0) >= lengths.cpu().unsqueeze(1)  # (B', T): past the end
        after = after if batch_first else after.T
        tag = _full(self.tag(padded), tuple(padded.shape)).clone()
        tag[after] = MIXED
        self.set(padded, _compact(tag))
        self.unknown.append("padding to the batch's longest sequence (no total_length)")
        return out

    def _untraceable(self) -> Tag:
        if not self.unknown or self.unknown[-1] != _ALIASED:
            self.unknown.append(_ALIASED)
        return _ALL

    def index_tag(self, x: Tensor) -> Tag:
        """The tag of ``x`` used as indices: for those a sort or ``nonzero`` returned, the
        example of the element each points at (as data, their values depend on every element
        they were chosen among)."""
        self._pointing = True
        try:
            return self.tag(x)
        finally:
            self._pointing = False

    def set(self, x: Tensor, tag: Tag) -> None:
        self._tags[id(x)] = (weakref.ref(x), tag, self._writes)

    def point(self, x: Tensor, tag: Tag) -> None:
        """Give indices ``x`` their pointer tag (see :meth:`index_tag`)."""
        self._pointers[id(x)] = (weakref.ref(x), tag)

    @contextmanager
    def paused(self):
        """Operations not followed (bookkeeping whose results the model never sees, or whose
        tags the caller sets)."""
        if _get_current_dispatch_mode() is self:
            with _pop_mode_temporarily():
                yield
        else:
            yield

    def _write(self, x: Tensor, tag: Tag) -> None:
        """``x`` changed in place to ``tag``. Unless no tag changed, the tags written are kept
        for its memory's elements, for its aliases to read (:meth:`_refreshed`)."""
        old = self.tag(x)
        # constants written (a dropout mask drawn into empty memory), or nothing changed: every
        # alias's tag still contains what it holds
        if unmarked(tag) or (_same(tag, old) and not _has_mixed(old)):
            self.set(x, tag)
            return
        self._writes += 1
        key = _storage(x)
        self._changed[key] = self._writes
        if key == -1 or x.layout != torch.strided:
            self._lost = True  # where it wrote cannot be known
            return
        length = x.untyped_storage().nbytes() // x.element_size()
        written = self._memory.get(key)
        if written is None or written[2] != x.element_size() or len(written[0]) != length:
            written = self._memory[key] = (
                torch.zeros(length, dtype=torch.int64),
                torch.full((length,), MIXED, dtype=torch.int64),
                x.element_size(),
            )
        where = _positions(x)
        written[0][where] = self._writes
        written[1][where] = _full(tag, tuple(x.shape))
        self.set(x, tag)

    def _fail(self, plan: _Plan, args, kwargs, out, error: Exception) -> None:
        """An operation pergrad could not follow: its outputs are ``MIXED``, and so is every
        alias of what it changed in place."""
        self.unknown.append(f"{plan.name} ({type(error).__name__}: {error})")
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, Tensor):
                self.set(x, _ALL)
        try:
            for w in _written(plan, args, kwargs):
                self._writes += 1
                self._changed[_storage(w)] = self._writes
                self.set(w, _ALL)
        except Exception:  # not even where it wrote is known
            self._lost = True

    # the dispatch ---------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plan = _PLANS.get(func) or _plan(func)
        if plan.random and randomness.draws(func, args, kwargs):
            self.random.append(plan.name)
        if plan.layout:  # its layout, before the change
            x = args[0]
            self.before = (tuple(x.shape), x.stride(), x.storage_offset())
        out = func(*args, **kwargs)
        try:
            try:
                if plan.handler is None:
                    raise _Unknown
                tags = plan.handler(self, func, args, kwargs, out)
            except _Unknown:
                tags = self._unknown(func, args, kwargs)
            if type(out) is Tensor and not plan.writes and not isinstance(tags, list):
                self._tags[id(out)] = (weakref.ref(out), tags, self._writes)  # the common case
            else:
                self._assign(plan, args, kwargs, out, tags)
            if self._pointers and plan.handler in _MOVES_POINTERS:
                self._carry_pointers(plan, func, args, kwargs, out)
        except Exception as error:  # a case a handler does not cover: nothing is known
            self._fail(plan, args, kwargs, out, error)
        return out

    def _assign(self, plan: _Plan, args, kwargs, out, tags) -> None:
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        if not isinstance(tags, (tuple, list)):
            tags = [tags] * len(outputs)
        written = [] if plan.layout else _written(plan, args, kwargs)
        for x, tag in zip(outputs, tags):
            if isinstance(x, Tensor):
                if any(x is w for w in written):
                    self._write(x, tag)
                else:
                    self.set(x, tag)
        for w in written:  # changed, not returned (a batch norm's running statistics)
            if not any(w is x for x in outputs):
                self._write(w, _ALL)

    def _carry_pointers(self, plan: _Plan, func, args, kwargs, out) -> None:
        """Indices viewed, copied or cut keep pointing at the elements they pointed at."""
        if not any(id(x) in self._pointers for x in _tensor_args(args, kwargs)):
            return
        self._pointing = True
        try:
            tags = plan.handler(self, func, args, kwargs, out)
        finally:
            self._pointing = False
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        tags = tags if isinstance(tags, (tuple, list)) else [tags] * len(outputs)
        for x, tag in zip(outputs, tags):
            if isinstance(x, Tensor):
                self.point(x, tag)

    def _unknown(self, func, args, kwargs) -> Tensor:
        """Outside what pergrad follows: the union of every input over everything."""
        found = NONE
        for x in _tensor_args(args, kwargs):
            one = single(self.tag(x), tuple(x.shape))
            found = one if found in (NONE, one) else MIXED
        if found == MIXED:
            self.unknown.append(str(func))
        return torch.tensor(found)


_ALIASED = "a tensor whose memory the model changed in place through another tensor"


class _Unknown(Exception):
    pass


def _has_mixed(tag: Tag) -> bool:
    return isinstance(tag, Tensor) and bool((tag == MIXED).any())


def _same(a: Tag, b: Tag) -> bool:
    if isinstance(a, Axis) or isinstance(b, Axis):
        return a == b
    return a is b or (a.shape == b.shape and bool((a == b).all()))


def _positions(x: Tensor) -> Tensor:
    """The position in its memory of each element of ``x`` (in elements of its type)."""
    length = x.untyped_storage().nbytes() // x.element_size()
    return torch.arange(length).as_strided(x.shape, x.stride(), x.storage_offset())


def _storage(x: Tensor) -> int:
    """A key for the memory ``x`` reads (``-1`` for a tensor without one: every such
    tensor is taken to alias every other)."""
    try:
        return x.untyped_storage().data_ptr()
    except Exception:
        return -1


@dataclass(frozen=True)
class _Plan:
    """What the dispatch does for one operation, found once."""

    name: str
    handler: object  # (mode, func, args, kwargs, out) -> tag(s); None: not followed
    writes: tuple  # (position, name) of the arguments it changes in place
    layout: bool  # it changes its first input's layout in place
    random: bool  # it draws random numbers


_PLANS: dict = {}


def _plan(func) -> _Plan:
    handler = _HANDLERS.get(func.overloadpacket)
    if handler is None and torch.Tag.pointwise in func.tags:
        handler = _pointwise
    schema = func._schema
    writes = tuple(
        (i, argument.name)
        for i, argument in enumerate(schema.arguments)
        if argument.alias_info is not None and argument.alias_info.is_write
    )
    layout = func.overloadpacket in _RESHAPED_IN_PLACE
    random = randomness.may_draw(func)
    plan = _PLANS[func] = _Plan(str(func), handler, writes, layout, random)
    return plan


def _written(plan: _Plan, args, kwargs) -> list[Tensor]:
    """The tensors the operation changes in place."""
    found = []
    for i, name in plan.writes:
        value = args[i] if i < len(args) else kwargs.get(name)
        found.extend(x for x in pytree.tree_leaves(value) if isinstance(x, Tensor))
    return found


def _tensor_args(args, kwargs) -> list[Tensor]:
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(x for x in a if isinstance(x, Tensor))
    return found


# handlers: (mode, func, args, kwargs, out) -> tag, or a list of tags for several outputs ------

_HANDLERS: dict = {}


def _handles(*packets):
    def register(handler):
        for packet in packets:
            _HANDLERS[packet] = handler
        return handler

    return register


def _combine(tags: list[Tag], shape: tuple[int, ...]) -> Tag:
    """The element-wise union of tags of values broadcast to ``shape``."""
    found: Tag = _NOTHING
    for tag in tags:
        if isinstance(tag, Tensor) and tag.dim() == 0 and int(tag) == NONE:
            continue
        if found is _NOTHING or _same(found, tag):
            found = tag
        else:
            found = _compact(merge(table(found, shape), table(tag, shape)))
    return found


def _union(mode: Provenance, values: list[Tensor], shape) -> Tag:
    """Element-wise union of the tags of ``values`` broadcast to ``shape``."""
    tags = []
    for x in values:
        tag = mode.tag(x)
        if isinstance(tag, Axis) and x.dim() and x.shape[tag.dim] != shape[tag.dim]:
            tag = tag.table(x.shape[tag.dim])  # broadcast from length 1
        tags.append(tag)
    return _combine(tags, shape)


def _pointwise(mode, func, args, kwargs, out):
    found = _NOTHING
    for a in args:  # the common case first: one tag, or one tag and constants
        if isinstance(a, Tensor):
            tag = mode.tag(a)
            if tag is _NOTHING:
                continue
            if (
                type(tag) is not Axis
                or a.shape != out.shape
                or not (found is _NOTHING or tag == found)
            ):
                break
            found = tag
        elif isinstance(a, (list, tuple)):
            break
    else:
        if not kwargs:
            return found
    return _union(mode, _tensor_args(args, kwargs), tuple(_first(out).shape))


def _first(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


_handles(
    aten.masked_fill,
    aten.masked_fill_,
    aten.where,
    aten.clamp,
    aten.lerp,
    aten.addcmul,
    aten.addcdiv,
)(_pointwise)  # element-wise, though not all their overloads say so (the in-place ones)


@_handles(aten._prelu_kernel)
def _prelu(mode, func, args, kwargs, out):
    """Each element from its own and its channel's slope (dim 1, not broadcast from the
    right): the input's tag, where the slopes come from no example."""
    if not unmarked(mode.tag(args[1])):
        raise _Unknown
    return mode.tag(args[0])


@_handles(aten._trilinear)
def _trilinear(mode, func, args, kwargs, out):
    """``Σ_sumdim i₁ ⊙ i₂ ⊙ i₃``, each input with size-1 dimensions added at its ``expand``
    positions (``torch.bilinear``): the union of the three, then reduced over ``sumdim``."""
    tensors, expands, sumdim = args[:3], args[3:6], args[6]
    shapes, tags = [], []
    for x, dims in zip(tensors, expands):
        shape = list(x.shape)
        for d in sorted(dims):
            shape.insert(d, 1)
        shapes.append(tuple(shape))
        tags.append(reshaped(mode.tag(x), tuple(x.shape), tuple(shape)))
    full = tuple(torch.broadcast_shapes(*shapes))
    for i, (tag, shape) in enumerate(zip(tags, shapes)):
        if isinstance(tag, Axis) and shape[tag.dim] != full[tag.dim]:
            tags[i] = tag.table(shape[tag.dim])  # broadcast from length 1
    tag = reduce(_combine(tags, full), full, sumdim, keepdim=False)
    _note_mixing(mode, func, tensors[0], tag)
    return tag


@_handles(
    aten.arange, aten.zeros, aten.ones, aten.full, aten.scalar_tensor, aten.randn, aten.rand,
    aten.randint, aten.randperm, aten.zeros_like, aten.ones_like, aten.full_like,
    aten.rand_like, aten.randn_like, aten.randint_like, aten.linspace, aten.eye, aten.tril_indices,
    aten.triu_indices, aten.fill, aten.fill_, aten.zero_, aten.normal_, aten.uniform_,
    aten.random_, aten.exponential_, aten.sym_size, aten.sym_stride, aten.sym_numel,
    aten._local_scalar_dense, aten.is_nonzero, aten.equal,
)  # fmt: skip
def _constant(mode, func, args, kwargs, out):
    if func.overloadpacket in (aten.fill, aten.fill_) and isinstance(args[1], Tensor):
        return _union(mode, [args[1]], tuple(out.shape))
    return _NOTHING


@_handles(aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided)
def _uninitialized(mode, func, args, kwargs, out):
    return _ALL  # whatever a kernel mode cannot see writes into it


@_handles(aten.new_zeros, aten.new_ones, aten.new_full, aten.bernoulli_, aten.bernoulli)
def _like(mode, func, args, kwargs, out):
    if func.overloadpacket in (aten.bernoulli, aten.bernoulli_) and len(args) > 1:
        if isinstance(args[1], Tensor):
            return _union(mode, [args[1]], tuple(out.shape))
    if func.overloadpacket is aten.bernoulli:
        return _union(mode, [args[0]], tuple(out.shape))
    return _NOTHING


@_handles(
    aten.alias, aten.detach, aten.clone, aten._to_copy, aten.lift_fresh, aten.lift_fresh_copy,
    aten.contiguous, aten.resolve_conj, aten.resolve_neg, aten._conj, aten.expand, aten.to,
    aten.native_dropout,
)  # fmt: skip
def _same_tag(mode, func, args, kwargs, out):
    tag = mode.tag(args[0])
    if func.overloadpacket is aten.native_dropout:
        return [tag, tag]
    return tag


@_handles(aten.copy_, aten.copy)
def _copy(mode, func, args, kwargs, out):
    return _union(mode, [args[1]], tuple(args[0].shape))


@_handles(aten.view, aten._unsafe_view, aten.reshape, aten._reshape_alias, aten.unsqueeze,
          aten.squeeze, aten.flatten, aten.unflatten, aten.view_as)  # fmt: skip
def _reshape(mode, func, args, kwargs, out):
    return reshaped(mode.tag(args[0]), tuple(args[0].shape), tuple(out.shape))


_RESHAPED_IN_PLACE = {
    aten.transpose_, aten.t_, aten.swapaxes_, aten.squeeze_, aten.unsqueeze_, aten.as_strided_,
}  # fmt: skip
"""In-place changes of a tensor's layout: no element changes, so no alias's tag does."""


@_handles(aten.unsqueeze_, aten.squeeze_)
def _reshape_in_place(mode, func, args, kwargs, out):
    return reshaped(mode.tag(args[0]), mode.before[0], tuple(args[0].shape))


@_handles(aten.as_strided, aten.as_strided_)
def _as_strided(mode, func, args, kwargs, out):
    """Elements read at any offsets of the storage: the tags laid out in the storage (those of
    elements the input does not cover unknown), read at the same offsets."""
    x = args[0]
    if func.overloadpacket is aten.as_strided_:
        shape, stride, offset = mode.before
    else:
        shape, stride, offset = tuple(x.shape), x.stride(), x.storage_offset()
    length = x.untyped_storage().nbytes() // x.element_size()
    storage = torch.full((length,), MIXED, dtype=torch.int64)
    where = torch.arange(length).as_strided(shape, stride, offset)
    storage[where.reshape(-1)] = _full(mode.tag(x), shape).reshape(-1)
    size, new_stride = args[1], args[2]
    new_offset = args[3] if len(args) > 3 and args[3] is not None else out.storage_offset()
    return _compact(storage.as_strided(size, new_stride, new_offset))


@_handles(aten.permute, aten.transpose, aten.t, aten.movedim, aten.swapaxes, aten.numpy_T,
          aten.transpose_, aten.t_, aten.swapaxes_)  # fmt: skip
def _permute(mode, func, args, kwargs, out):
    x = args[0]
    ndim = x.dim()
    if ndim < 2:
        return mode.tag(x)
    packet = func.overloadpacket
    if packet is aten.permute:
        order = [d % ndim for d in args[1]]
    elif packet in (aten.t, aten.t_, aten.numpy_T):
        order = list(range(ndim))[::-1]
    elif packet in (aten.transpose, aten.swapaxes, aten.transpose_, aten.swapaxes_):
        order = list(range(ndim))
        a, b = args[1] % ndim, args[2] % ndim
        order[a], order[b] = order[b], order[a]
    else:
        raise _Unknown
    tag = mode.tag(x)
    if isinstance(tag, Axis):
        new = order.index(tag.dim % ndim)
        return Axis(new - ndim, tag.stride, tag.size)
    if tag.dim() == 0:
        return tag
    return _compact(_pad(tag, ndim).permute(order))


@_handles(aten.select)
def _select(mode, func, args, kwargs, out):
    x, dim, index = args[0], args[1] % args[0].dim(), args[2]
    tag = mode.tag(x)
    if isinstance(tag, Axis):
        axis = tag.dim % x.dim()
        if axis == dim:
            return torch.tensor(int(tag.table(x.shape[dim]).reshape(-1)[index]))
        return tag if dim < axis else Axis(tag.dim + 1, tag.stride, tag.size)
    t = _pad(tag, x.dim())
    return _compact(t.select(dim, index if t.shape[dim] > 1 else 0))


@_handles(aten.slice)
def _slice(mode, func, args, kwargs, out):
    x = args[0]
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % x.dim()
    start = args[2] if len(args) > 2 else kwargs.get("start")
    end = args[3] if len(args) > 3 else kwargs.get("end")
    step = args[4] if len(args) > 4 else kwargs.get("step", 1)
    return _sliced(mode.tag(x), tuple(x.shape), dim, slice(start, end, step))


def _sliced(tag: Tag, shape, dim: int, part: slice) -> Tag:
    if isinstance(tag, Axis):
        axis = tag.dim % len(shape)
        if axis != dim:
            return tag
        tag = tag.table(shape[dim])
    t = _pad(tag, len(shape))
    if t.shape[dim] == 1:
        return tag
    index = [slice(None)] * len(shape)
    index[dim] = part
    return _compact(t[tuple(index)])


@_handles(aten.split, aten.split_with_sizes, aten.unbind, aten.chunk, aten.unsafe_split,
          aten.tensor_split, aten.split_with_sizes_copy, aten.unsafe_split_with_sizes)  # fmt: skip
def _split(mode, func, args, kwargs, out):
    x = args[0]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % x.dim()
    if func.overloadpacket is aten.unbind:
        dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % x.dim()
    tag, shape, found, start = mode.tag(x), tuple(x.shape), [], 0
    for piece in out:
        if func.overloadpacket is aten.unbind:
            found.append(_select(mode, aten.select.int, (x, dim, start), {}, piece))
            start += 1
            continue
        length = piece.shape[dim]
        found.append(_sliced(tag, shape, dim, slice(start, start + length)))
        start += length
    return found


@_handles(aten.cat)
def _cat(mode, func, args, kwargs, out):
    values = [x for x in args[0] if not (x.dim() == 1 and x.numel() == 0)]
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % out.dim()
    tags = [mode.tag(x) for x in values]
    known = [t for t in tags if t is not _NOTHING]
    if not known:
        return _NOTHING
    if (
        all(isinstance(t, Axis) and t == known[0] for t in known)
        and known[0].dim % out.dim() != dim
    ):
        return known[0]  # a position without an example takes that of its neighbours
    parts = []
    for x, t in zip(values, tags):
        full = _pad(table(t, tuple(x.shape)), out.dim())
        sizes = [1 if s == 1 else n for s, n in zip(full.shape, out.shape)]
        sizes[dim] = x.shape[dim]
        parts.append(full.expand(sizes))
    sizes = [max(p.shape[d] for p in parts) for d in range(out.dim())]
    parts = [p.expand(*sizes[:dim], p.shape[dim], *sizes[dim + 1 :]) for p in parts]
    return _compact(torch.cat(parts, dim))


@_handles(aten.stack)
def _stack(mode, func, args, kwargs, out):
    dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % out.dim()
    shapes = [(*x.shape[:dim], 1, *x.shape[dim:]) for x in args[0]]
    tags = [reshaped(mode.tag(x), tuple(x.shape), s) for x, s in zip(args[0], shapes)]
    if all(isinstance(t, Axis) and t == tags[0] for t in tags) and tags[0].dim % out.dim() != dim:
        return tags[0]
    return _compact(torch.cat([_full(t, s) for t, s in zip(tags, shapes)], dim))


@_handles(aten.flip, aten.roll, aten.repeat, aten.constant_pad_nd, aten.unfold, aten.tile,
          aten.diagonal, aten.tril, aten.triu)  # fmt: skip
def _moves(mode, func, args, kwargs, out):
    """Operations that move elements: the same operation on the table."""
    x = args[0]
    tag = mode.tag(x)
    packet = func.overloadpacket
    if packet in (aten.tril, aten.triu):  # zeros where the mask says: no new example
        return tag
    if isinstance(tag, Tensor) and tag.dim() == 0:
        return tag
    if isinstance(tag, Axis):
        axis = tag.dim % x.dim()
        untouched = {
            aten.flip: lambda: axis not in [d % x.dim() for d in args[1]],
            aten.roll: lambda: (
                len(args) > 2 and len(args[2]) > 0 and axis not in [d % x.dim() for d in args[2]]
            ),
            aten.repeat: lambda: args[1][len(args[1]) - x.dim() + axis] == 1,
            aten.constant_pad_nd: lambda: axis < x.dim() - len(args[1]) // 2,
            aten.unfold: lambda: axis != args[1] % x.dim(),
        }.get(packet)
        if untouched is not None and untouched():
            return tag if packet is not aten.unfold else Axis(tag.dim - 1, tag.stride, tag.size)
    full = _full(tag, tuple(x.shape))
    if packet is aten.constant_pad_nd:
        return _compact(torch.constant_pad_nd(full, args[1], NONE))
    rest = [a for a in args[1:]]
    return _compact(func(full.contiguous(), *rest))


_REDUCTIONS = {
    # packet: (position of dims, position of keepdim); dims None means all
    aten.sum: (1, 2), aten.mean: (1, 2), aten.amax: (1, 2), aten.amin: (1, 2),
    aten.prod: (1, 2), aten.logsumexp: (1, 2), aten.any: (1, 2), aten.all: (1, 2),
    aten.nansum: (1, 2), aten.argmax: (1, 2), aten.argmin: (1, 2), aten.max: (1, 2),
    aten.min: (1, 2), aten.linalg_vector_norm: (2, 3), aten.norm: (2, 3), aten.var: (1, 3),
    aten.std: (1, 3), aten.var_mean: (1, 3), aten.std_mean: (1, 3), aten.count_nonzero: (1, None),
    aten.median: (1, 2), aten.aminmax: (1, 2), aten.nanmedian: (1, 2), aten.mode: (1, 2),
    aten.kthvalue: (2, 3),
}  # fmt: skip


@_handles(*_REDUCTIONS)
def _reduction(mode, func, args, kwargs, out):
    x = args[0]
    shape = tuple(x.shape)
    at, keep_at = _REDUCTIONS[func.overloadpacket]
    names = _names(func)
    dims = _argument(args, kwargs, names, at, ("dim",))
    keepdim = bool(_argument(args, kwargs, names, keep_at, ("keepdim",)) or False)
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        dims, keepdim = range(x.dim()), keepdim and dims is not None
    elif isinstance(dims, int):
        dims = [dims]
    if not shape:
        return mode.tag(x)
    tag = reduce(mode.tag(x), shape, dims, keepdim)
    _note_mixing(mode, func, x, tag)
    return tag


_NAMES: dict = {}


def _names(func) -> list[str]:
    """The names of the operation's arguments, in order (found once)."""
    found = _NAMES.get(func)
    if found is None:
        found = _NAMES[func] = [a.name for a in func._schema.arguments]
    return found


def _argument(args, kwargs, names, at, keys):
    """The argument at position ``at`` (checked against the schema's names) or by keyword."""
    if at is not None and at < len(args) and at < len(names) and names[at] in keys + ("dims",):
        return args[at]
    for key in keys + ("dims",):
        if key in kwargs:
            return kwargs[key]
    return None


def _note_mixing(mode, func, x, tag) -> None:
    if isinstance(tag, Tensor) and bool((tag == MIXED).any()):
        before = mode.tag(x)
        if isinstance(before, Axis) or not bool((before == MIXED).any()):
            mode.mixing.append(str(func))


@_handles(aten._softmax, aten._log_softmax, aten._safe_softmax, aten.cumsum, aten.cumprod,
          aten.logcumsumexp, aten.cummax, aten.cummin, aten.softmax, aten.log_softmax,
          aten.glu)  # fmt: skip
def _along(mode, func, args, kwargs, out):
    x, dim = args[0], args[1]
    tag = reduce(mode.tag(x), tuple(x.shape), [dim]) if x.dim() else mode.tag(x)
    _note_mixing(mode, func, x, tag)
    return [tag, tag] if isinstance(out, (tuple, list)) else tag


@_handles(aten.sort, aten.topk, aten.argsort)
def _sort(mode, func, args, kwargs, out):
    """Values come from the elements they are; indices, as data, from every element sorted
    among (a rank), and, as indices, point at the elements they name (:meth:`Provenance.
    index_tag`). topk's choice of elements along a dimension with several examples depends on
    all of them: mixed."""
    x = args[0]
    names = _names(func)
    dim = _argument(args, kwargs, names, names.index("dim"), ("dim",))
    dim = -1 if dim is None else dim
    if not x.dim():
        return mode.tag(x)
    tag = mode.tag(x)
    along = reduce(tag, tuple(x.shape), [dim])
    if _has_mixed(along) and func.overloadpacket is aten.topk:
        mode.mixing.append(str(func))
        return [_ALL, _ALL]
    _note_mixing(mode, func, x, along)  # where the indices are used as data
    indices = out if func.overloadpacket is aten.argsort else out[1]
    picked = _picked(tag, x, dim, indices)
    mode.point(indices, _picked(mode.index_tag(x), x, dim, indices))  # sorted indices: theirs
    return along if func.overloadpacket is aten.argsort else [picked, along]


def _picked(tag: Tag, x: Tensor, dim: int, indices: Tensor) -> Tag:
    """The tags of the elements of ``x`` that ``indices`` pick along ``dim``."""
    if isinstance(tag, Axis) and tag.dim % x.dim() != dim % x.dim():
        return tag
    return _compact(_full(tag, tuple(x.shape)).gather(dim, indices.cpu()))


@_handles(aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.dot, aten.vdot, aten.mv,
          aten.addmv, aten.matmul, aten._int_mm)  # fmt: skip
def _matmul(mode, func, args, kwargs, out):
    if func.overloadpacket in (aten.addmm, aten.baddbmm, aten.addmv):
        bias, a, b = args[0], args[1], args[2]
    else:
        bias, a, b = None, args[0], args[1]
    rows = mode.tag(a)
    if (  # the common case: a layer's rows times a parameter
        type(rows) is Axis
        and rows.dim != -1
        and b.dim() == 2
        and mode.tag(b) is _NOTHING
        and (bias is None or mode.tag(bias) is _NOTHING)
    ):
        return rows
    shape = tuple(out.shape)
    if a.dim() == 1:
        rows: Tag = torch.tensor(single(mode.tag(a), tuple(a.shape)))
    else:
        rows = reduce(mode.tag(a), tuple(a.shape), [-1], keepdim=b.dim() != 1)
    if b.dim() == 1:
        columns: Tag = torch.tensor(single(mode.tag(b), tuple(b.shape)))
    else:
        columns = reduce(mode.tag(b), tuple(b.shape), [-2], keepdim=a.dim() != 1)
    tags = [rows, columns]
    if bias is not None:
        tags.append(_union(mode, [bias], shape))
    found = _combine(tags, shape)
    if not isinstance(found, Axis):
        _note_mixing(mode, func, a, found)
    return found


@_handles(
    aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
    aten._scaled_dot_product_attention_math, aten._flash_attention_forward,
    aten._efficient_attention_forward, aten.scaled_dot_product_attention,
)  # fmt: skip
def _attention(mode, func, args, kwargs, out):
    """A query's output comes from its own row, every key and value, and its mask row."""
    q, k, v = args[:3]
    first = _first(out)
    shape = tuple(first.shape)
    names = _names(func)
    mask = None
    for key in ("attn_mask", "attn_bias"):
        if key in names:
            at = names.index(key)
            mask = args[at] if at < len(args) else kwargs.get(key)
    tags = [reduce(mode.tag(q), tuple(q.shape), [-1])]
    tags += [reduce(mode.tag(x), tuple(x.shape), [-2, -1]) for x in (k, v)]
    if isinstance(mask, Tensor):
        tags.append(reduce(mode.tag(mask), tuple(mask.shape), [-1]))
    found = _combine(tags, shape)
    if isinstance(out, (tuple, list)):
        return [found] + [_ALL] * (len(out) - 1)
    return found


@_handles(aten.convolution, aten._convolution, aten.convolution_overrideable,
          aten.mkldnn_convolution, aten.cudnn_convolution)  # fmt: skip
def _convolution(mode, func, args, kwargs, out):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 and isinstance(args[2], Tensor) else None
    tag = reduce(mode.tag(x), tuple(x.shape), range(1, x.dim()))
    for param in (weight, bias):
        if param is not None and single(mode.tag(param), tuple(param.shape)) != NONE:
            raise _Unknown
    _note_mixing(mode, func, x, tag)
    return tag


@_handles(aten.native_layer_norm, aten.native_group_norm, aten._fused_rms_norm)
def _norm(mode, func, args, kwargs, out):
    x = args[0]
    packet = func.overloadpacket
    if packet is aten.native_group_norm:
        dims = range(1, x.dim())
    else:
        dims = range(x.dim() - len(args[1]), x.dim())
    tag = reduce(mode.tag(x), tuple(x.shape), dims)
    for extra in args[2:4] if packet is not aten.native_group_norm else args[1:3]:
        if isinstance(extra, Tensor) and mode.tag(extra) is not _NOTHING:
            raise _Unknown
    if packet is aten.native_group_norm:
        per_example = reduce(tag, tuple(x.shape), range(1, x.dim()), keepdim=False)
        stats = (
            per_example.unsqueeze(-1)
            if isinstance(per_example, Tensor) and per_example.dim()
            else (
                Axis(-2, per_example.stride, per_example.size)
                if isinstance(per_example, Axis)
                else per_example
            )
        )
        return [tag, stats, stats]
    return [tag] * len(out) if isinstance(out, (tuple, list)) else tag


@_handles(aten._native_batch_norm_legit, aten.native_batch_norm,
          aten._native_batch_norm_legit_functional, aten._native_batch_norm_legit_no_training,
          aten.cudnn_batch_norm, aten.miopen_batch_norm)  # fmt: skip
def _batch_norm(mode, func, args, kwargs, out):
    x = args[0]
    names = _names(func)
    training = func.overloadpacket is not aten._native_batch_norm_legit_no_training and bool(
        args[names.index("training")] if "training" in names else True
    )
    dims = [d for d in range(x.dim()) if d != 1] if training else []
    tag = reduce(mode.tag(x), tuple(x.shape), dims)
    _note_mixing(mode, func, x, tag)
    return [tag] + [_ALL] * (len(out) - 1)


@_handles(aten.embedding)
def _embedding(mode, func, args, kwargs, out):
    weight, indices = args[0], args[1]
    if single(mode.tag(weight), tuple(weight.shape)) != NONE:
        raise _Unknown
    tag = mode.tag(indices)
    if isinstance(tag, Axis):
        return Axis(tag.dim - 1, tag.stride, tag.size)
    return tag.unsqueeze(-1) if tag.dim() else tag


@_handles(aten.nonzero, aten.argwhere)
def _nonzero(mode, func, args, kwargs, out):
    """Each coordinate points at an element of the mask (that element's example, for
    indexing); as data, it depends on every element before it."""
    x = args[0]
    ids = _full(mode.tag(x), tuple(x.shape))[x.cpu() != 0]
    mode.point(out, _compact(ids.unsqueeze(-1)))
    return torch.tensor(single(mode.tag(x), tuple(x.shape))) if x.dim() else mode.tag(x)


@_handles(aten._pack_padded_sequence)
def _pack(mode, func, args, kwargs, out):
    """Packed rows are elements moved, each from where the padded input held it; the count of
    sequences longer than each step comes from every example's length."""
    x, lengths, batch_first = args[0], args[1], args[2]
    full = _full(mode.tag(x), tuple(x.shape)).contiguous()
    data, _ = func(full, lengths, batch_first)
    return [_compact(data), torch.tensor(single(mode.tag(lengths), tuple(lengths.shape)))]


@_handles(aten.mkldnn_rnn_layer)
def _recurrence(mode, func, args, kwargs, out):
    """oneDNN's recurrent layer (a float32 LSTM on CPU) on steps ``(T, B, in)`` from states
    ``(B, H)``: see :func:`_sequences`; its workspace from every sequence."""
    x, states = args[0], [a for a in args[5:7] if isinstance(a, Tensor)]
    column = _sequences(mode, x, 1, [(s, 0) for s in states], args[1:5])
    size = len(column)
    workspace = torch.tensor(single(_compact(column.contiguous()), (size,)))
    each = _compact(column.view(size, 1))
    return [_compact(column.view(1, size, 1)), each, each, workspace]


_RECURRENT = frozenset({torch.rnn_tanh, torch.rnn_relu, torch.gru, torch.lstm})


def _sequences(mode, x: Tensor, dim: int, states, weights, rows: Tensor | None = None) -> Tensor:
    """The examples of each sequence of a recurrent layer, ``(B,)``: the union of its steps'
    (along ``dim`` of ``x``; packed, the rows of ``x`` that ``rows`` gives to it), of its
    initial states' (``(tensor, dim)`` each), and of every example any of the ``weights``
    comes from. All its steps are taken together: an over-approximation of each step's
    output, which comes from the steps before it."""
    if rows is None:
        found = _per_index(mode, x, dim)
    else:
        size = int(rows.max()) + 1 if len(rows) else 0
        found = _scatter_union(torch.full((size,), NONE), rows, _per_index(mode, x, 0))
    tags = [found, *(_per_index(mode, state, at) for state, at in states)]
    for w in weights:  # every example a weight comes from reaches every sequence
        tags.append(torch.tensor(single(mode.tag(w), tuple(w.shape))))
        if int(tags[-1]) != NONE:
            mode.mixing.append("a recurrent layer whose weights come from an example")
    return _full(_combine(tags, (len(found),)), (len(found),))


def _per_index(mode, x: Tensor, dim: int) -> Tensor:
    """The union of ``x``'s tags over every dimension but ``dim``: ``(x.shape[dim],)``."""
    shape = tuple(x.shape)
    tag = reduce(mode.tag(x), shape, [d for d in range(len(shape)) if d != dim % len(shape)])
    index = [0] * len(shape)
    index[dim] = slice(None)
    return _full(tag, shape)[tuple(index)].contiguous()


@_handles(aten.masked_select)
def _masked_select(mode, func, args, kwargs, out):
    x, mask = args[0], args[1]
    shape = torch.broadcast_shapes(x.shape, mask.shape)
    tag = _union(mode, [x, mask], tuple(shape))
    return _compact(_full(tag, tuple(shape))[mask.cpu().expand(shape)])


def _advanced(mode: Provenance, shape, indices) -> tuple[tuple, Tensor | None, int, tuple]:
    """For ``value[indices]`` (advanced indexing, as ``aten.index`` takes it): the indices on
    the CPU (masks as coordinates), the union of the index tensors' own tags laid out as the
    indexed dimensions of the result (``None``: all ``NONE``), where those dimensions start in
    the result, and their shape."""
    cpu, entries, d = [], [], 0
    for i in indices:
        if i is None:  # this dimension whole (in Python's indexing, None adds one)
            cpu.append(slice(None))
            d += 1
            continue
        tag = mode.index_tag(i)
        if i.dtype in (torch.bool, torch.uint8):
            mask = i.cpu().bool()
            coordinates = mask.nonzero(as_tuple=True)
            picked = None if tag is _NOTHING else _full(tag, tuple(i.shape))[mask]
            for c in coordinates:
                cpu.append(c)
                entries.append((d, c, picked))
                d += 1
        else:
            c = i.cpu()
            cpu.append(c)
            entries.append((d, c, None if tag is _NOTHING else _full(tag, tuple(i.shape))))
            d += 1
    dims = [e[0] for e in entries]
    start = dims[0] if dims == list(range(dims[0], dims[0] + len(dims))) else 0
    index_shape = tuple(torch.broadcast_shapes(*[c.shape for _, c, _ in entries]))
    trailing = len(shape) - len(dims)
    tags = None
    for _, _, t in entries:
        if t is not None:
            t = t.expand(index_shape).reshape(*[1] * start, *index_shape, *[1] * (trailing - start))
            tags = t if tags is None else merge(tags, t)
    return tuple(cpu), tags, start, index_shape


@_handles(aten.index, aten._unsafe_index)
def _index(mode, func, args, kwargs, out):
    x = args[0]
    cpu, tags, _, _ = _advanced(mode, tuple(x.shape), args[1])
    found = _full(mode.tag(x), tuple(x.shape))[cpu]
    return _compact(found if tags is None else merge(found, tags))


@_handles(aten.index_select)
def _index_select(mode, func, args, kwargs, out):
    x, dim, index = args[0], args[1] % max(1, args[0].dim()), args[2]
    tag = mode.tag(x)
    if mode.index_tag(index) is _NOTHING and isinstance(tag, Axis) and tag.dim % x.dim() != dim:
        return tag
    if isinstance(tag, Tensor) and tag.dim() == 0 and mode.index_tag(index) is _NOTHING:
        return tag
    picked = _full(tag, tuple(x.shape)).index_select(dim, index.cpu())
    index_tag = mode.index_tag(index)
    if index_tag is not _NOTHING:
        t = _full(index_tag, tuple(index.shape)).reshape(*[1] * dim, -1, *[1] * (x.dim() - dim - 1))
        picked = merge(picked, t)
    return _compact(picked.contiguous())


@_handles(aten.gather)
def _gather(mode, func, args, kwargs, out):
    x, dim, index = args[0], args[1] % max(1, args[0].dim()), args[2]
    tag = mode.tag(x)
    index_tag = mode.index_tag(index)
    if (
        isinstance(tag, Axis)
        and tag.dim % x.dim() != dim
        and (index_tag is _NOTHING or index_tag == tag)
    ):
        if index.shape[tag.dim] == x.shape[tag.dim]:
            return tag
    picked = _full(tag, tuple(x.shape)).gather(dim, index.cpu())
    if index_tag is not _NOTHING:
        picked = merge(picked, _full(index_tag, tuple(index.shape)))
    return _compact(picked)


@_handles(aten.index_add, aten.index_add_, aten.index_copy, aten.index_copy_, aten.index_fill,
          aten.index_fill_, aten.scatter, aten.scatter_, aten.scatter_add, aten.scatter_add_,
          aten.scatter_reduce, aten.scatter_reduce_, aten.index_put, aten.index_put_,
          aten._index_put_impl_, aten.masked_scatter, aten.masked_scatter_)  # fmt: skip
def _scatter(mode, func, args, kwargs, out):
    """At every position written, the union of what is written there (and of the index that
    chose the position), and, where the operation adds to it, of what was there."""
    x = args[0]
    shape = tuple(x.shape)
    positions = torch.arange(x.numel()).view(shape) if shape else torch.arange(1).view(())
    packet = func.overloadpacket
    source: Tensor | None = None
    if packet in (aten.index_add, aten.index_add_, aten.index_copy, aten.index_copy_,
                  aten.index_fill, aten.index_fill_):  # fmt: skip
        dim, index = args[1] % max(1, x.dim()), args[2]
        source = args[3] if len(args) > 3 and isinstance(args[3], Tensor) else None
        where = positions.index_select(dim, index.cpu()) if x.dim() else positions
        chosen = [(index, dim)]
    elif packet in (aten.scatter, aten.scatter_, aten.scatter_add, aten.scatter_add_,
                    aten.scatter_reduce, aten.scatter_reduce_):  # fmt: skip
        dim, index = args[1] % max(1, x.dim()), args[2]
        source = args[3] if len(args) > 3 and isinstance(args[3], Tensor) else None
        where = positions.gather(dim, index.cpu())
        chosen = [(index, None)]
    elif packet in (aten.masked_scatter, aten.masked_scatter_):
        mask = args[1].cpu().expand(shape)
        where = positions[mask]
        source = args[2]
        chosen = [(args[1], "mask")]
    else:  # index_put
        cpu, tags, _, _ = _advanced(mode, shape, args[1])
        where, source, chosen = positions[cpu], args[2], []
    old = _full(mode.tag(x), shape).reshape(-1) if shape else table(mode.tag(x), shape).reshape(1)
    new = torch.full(where.shape, NONE, dtype=torch.int64)
    if source is not None:
        written = _full(mode.tag(source), tuple(source.shape))
        if packet in (aten.masked_scatter, aten.masked_scatter_):
            written = written.reshape(-1)[: where.numel()]
        elif written.shape != where.shape:
            written = (
                written[tuple(slice(0, n) for n in where.shape)]
                if written.dim() == where.dim()
                else written.expand(where.shape)
            )
        new = merge(new, written)
    if packet in (aten.index_put, aten.index_put_, aten._index_put_impl_) and tags is not None:
        new = merge(new, tags)
    for index, how in chosen:
        index_tag = mode.index_tag(index)
        if index_tag is _NOTHING:
            continue
        if how == "mask":
            t = _full(index_tag, tuple(index.shape)).expand(shape)[args[1].cpu().expand(shape)]
        elif isinstance(how, int):
            t = _full(index_tag, tuple(index.shape)).reshape(
                *[1] * how, -1, *[1] * (x.dim() - how - 1)
            )
        else:
            t = _full(index_tag, tuple(index.shape))
        new = merge(new, t)
    new, where = new.expand(where.shape).reshape(-1), where.reshape(-1)
    if _overwrites(func, args, kwargs):
        old = old.clone()
        old[where] = NONE
    found = _scatter_union(old, where, new)
    return _compact(found.view(shape))


def _overwrites(func, args, kwargs) -> bool:
    """Whether a scatter writes over what was there rather than adding to it or reducing."""
    packet = func.overloadpacket
    if packet in (aten.index_put, aten.index_put_, aten._index_put_impl_):
        names = _names(func)
        return not _argument(args, kwargs, names, names.index("accumulate"), ("accumulate",))
    if packet in (aten.scatter, aten.scatter_):
        return "reduce" not in _names(func)
    return packet in (aten.index_copy, aten.index_copy_, aten.index_fill, aten.index_fill_,
                      aten.masked_scatter, aten.masked_scatter_)  # fmt: skip


def _scatter_union(old: Tensor, where: Tensor, new: Tensor) -> Tensor:
    """``old`` (flat) with the union of ``new[i]`` taken in at ``old[where[i]]``, for every
    ``i``: each tag as the lowest and highest example it may hold."""
    low = torch.where(old >= 0, old, torch.where(old == NONE, _BIG, -1))
    high = torch.where(old == MIXED, _BIG, old)
    new_low = torch.where(new >= 0, new, torch.where(new == NONE, _BIG, -1))
    new_high = torch.where(new == MIXED, _BIG, new)
    low = low.scatter_reduce(0, where, new_low, "amin")
    high = high.scatter_reduce(0, where, new_high, "amax")
    one = torch.where(high < 0, NONE, torch.where(low == high, high, MIXED))
    return torch.where((low == -1) | (high == _BIG), MIXED, one)


@_handles(aten._embedding_bag, aten._embedding_bag_forward_only)
def _embedding_bag(mode, func, args, kwargs, out):
    """Each bag from its indices (and their weights): the union over them."""
    weight, indices, offsets = args[:3]
    if single(mode.tag(weight), tuple(weight.shape)) != NONE or indices.dim() != 1:
        raise _Unknown
    weights = args[6] if len(args) > 6 else kwargs.get("per_sample_weights")
    ids = _full(mode.tag(indices), tuple(indices.shape))
    if isinstance(weights, Tensor):
        ids = merge(ids, _full(mode.tag(weights), tuple(weights.shape)))
    if single(mode.tag(offsets), tuple(offsets.shape)) != NONE:
        raise _Unknown
    bags = len(out[0])
    starts = offsets.cpu()[:bags]
    bag = torch.searchsorted(starts, torch.arange(len(indices)), right=True) - 1
    found = _scatter_union(torch.full((bags,), NONE), bag, ids.reshape(-1))
    return [_compact(found.unsqueeze(-1))] + [_ALL] * (len(out) - 1)


@_handles(
    aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.max_pool1d, aten.max_pool2d,
    aten.max_pool2d_with_indices, aten.max_pool3d_with_indices, aten.adaptive_avg_pool1d,
    aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
    aten._adaptive_avg_pool3d, aten.adaptive_max_pool1d, aten.adaptive_max_pool2d,
    aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_bilinear2d,
    aten.upsample_bicubic2d, aten.upsample_linear1d, aten._upsample_nearest_exact2d,
    aten.reflection_pad1d, aten.reflection_pad2d, aten.replication_pad1d, aten.replication_pad2d,
    aten.im2col, aten.col2im, aten.pixel_shuffle, aten.pixel_unshuffle, aten.channel_shuffle,
    aten.grid_sampler_2d,
)  # fmt: skip
def _per_sample(mode, func, args, kwargs, out):
    """Layers of images and signals: each output sample from its own input sample."""
    tensors = [x for x in args if isinstance(x, Tensor)]
    if any(x.dim() < 2 or len(x) != len(_first(out)) for x in tensors):  # not (N, …) to (N, …)
        raise _Unknown
    tags = [reduce(mode.tag(x), tuple(x.shape), range(1, x.dim())) for x in tensors]
    found = _combine(tags, tuple(_first(out).shape))
    if isinstance(found, Axis) and found.dim != -_first(out).dim():
        raise _Unknown
    return [found] * len(out) if isinstance(out, (tuple, list)) else found


@_handles(aten.nll_loss_forward, aten.nll_loss2d_forward, aten.mse_loss, aten.l1_loss,
          aten.binary_cross_entropy, aten.binary_cross_entropy_with_logits, aten.huber_loss,
          aten.smooth_l1_loss, aten.soft_margin_loss, aten.kl_div)  # fmt: skip
def _loss(mode, func, args, kwargs, out):
    """Per element (``reduction="none"``): the input's classes, or its element, and the
    target's; reduced: all of them."""
    x, target = args[0], args[1]
    names = _names(func)
    reduction = _argument(args, kwargs, names, names.index("reduction"), ("reduction",))
    nll = func.overloadpacket in (aten.nll_loss_forward, aten.nll_loss2d_forward)
    if nll:
        rows = reduce(mode.tag(x), tuple(x.shape), [1 if x.dim() > 1 else 0], keepdim=False)
        if x.dim() > 1 and isinstance(rows, Axis) and rows.dim < -target.dim():
            raise _Unknown
        tags = [rows, mode.tag(target)]
    else:
        tags = [mode.tag(x), mode.tag(target)]
    shape = tuple(target.shape) if nll else tuple(torch.broadcast_shapes(x.shape, target.shape))
    found = _combine(tags, shape)
    for extra in [*args[2:], *kwargs.values()]:  # class weights, pos_weight: any may mix
        if isinstance(extra, Tensor) and mode.tag(extra) is not _NOTHING:
            one = torch.tensor(single(mode.tag(extra), tuple(extra.shape)))
            found = _combine([found, one], shape)
            _note_mixing(mode, func, extra, found)
    if reduction not in (0, None):
        found = torch.tensor(single(found, shape)) if shape else found
        _note_mixing(mode, func, x, found)
    if nll:
        return [found, torch.tensor(single(found, shape)) if shape else found]
    return found


_MOVES_POINTERS = {_reshape, _permute, _select, _slice, _split, _same_tag, _cat, _stack}
"""Handlers of operations that view, copy or cut indices without computing with them."""
