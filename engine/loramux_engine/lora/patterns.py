r"""Module-name regular expressions from adapter configs, matched with bounded work.

PEFT reads ``target_modules`` and ``exclude_modules`` given as a string with
``re.fullmatch(pattern, name)``, and the keys of ``rank_pattern`` and ``alpha_pattern`` with
``re.match(rf"(.*\.)?({key})$", name)``. Run by ``re``, a tenant's pattern such as ``(a+)+$``
backtracks for as long as it likes, holding the GIL. Here no tenant text reaches ``re``: a
pattern is parsed into a subset of ``re``'s syntax (anything else is refused), compiled to a
Thompson NFA of bounded size, and run as a DFA built lazily over a trie of the base model's
module names, the only texts ever matched. A trie edge costs one cached DFA transition, a new
DFA state at most a walk over the NFA, and a :class:`Budget` caps the sum, so the work is
bounded whatever the pattern. The answer is ``re``'s: whether a regular expression matches a
text does not depend on the order a backtracking engine tries things in.

The subset: literal characters; ``\`` before punctuation; ``\d \D \w \W \s \S``;
``\a \f \n \r \t \v \\``; ``.``; classes ``[...]`` with ``^``, ranges and those escapes;
groups ``(...)`` and ``(?:...)``; ``|``; ``* + ? {m} {m,} {,n} {m,n}``, greedy or lazy; ``^`` and
``$``. Refused: backreferences, lookaround, flags, named, atomic and conditional groups,
possessive quantifiers, ``\b \B \A \Z``, numeric and named character escapes, and the set
syntax ``re`` warns will change (``[[``, ``--``, ``&&``, ``~~``, ``||`` in a class).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.pattern_syntax import (
    ANY,
    Alt,
    Anchor,
    Char,
    CharSet,
    Group,
    Node,
    Refused,
    Seq,
    node_size,
    parse,
    reverse,
)

MAX_PATTERN_CHARS = 512
MAX_NFA_STATES = 2048
# Work units for all the patterns of one config, each a microsecond or two of Python: an
# NFA state built or visited, a trie edge walked, PARSE_COST per pattern character parsed,
# PATTERN_COST per pattern compiled, STATE_COST per DFA state made. PEFT's one plain key per
# module (as EVA writes rank_pattern) costs about 100,000 on an 80-layer model.
MAX_WORK = 120_000
PARSE_COST = 2
PATTERN_COST = 64
STATE_COST = 8
# A key without these is plain characters and "." (any character but a newline).
_META = frozenset("\\[{()*+?^$|")

_SUBSET = (
    "module name patterns may use literals, \\-escaped punctuation, \\d \\w \\s, '.', [...], "
    "(...), (?:...), |, * + ? {m,n} and ^ $"
)


class Budget:
    """Work left for matching one config's patterns; the same count wherever it runs."""

    def __init__(self, limit: int = MAX_WORK) -> None:
        self.limit = limit
        self.spent = 0

    def spend(self, units: int) -> None:
        self.spent += units
        if self.spent > self.limit:
            raise UnsupportedAdapterError(
                "unsupported adapter: its module name patterns take too much work to resolve "
                f"against the base model (over {self.limit} steps); use fewer or simpler "
                "patterns, or list the module names"
            )


_CHAR, _SPLIT, _BOL, _EOL, _MATCH = range(5)


@dataclass
class _Nfa:
    kinds: list[int] = field(default_factory=list)
    chars: list[CharSet | None] = field(default_factory=list)
    out1: list[int] = field(default_factory=list)
    out2: list[int] = field(default_factory=list)
    # What testing a character against the state costs: its ranges and categories too.
    costs: list[int] = field(default_factory=list)
    start: int = -1

    def add(self, kind: int, out1: int = -1, out2: int = -1, chars: CharSet | None = None) -> int:
        self.kinds.append(kind)
        self.chars.append(chars)
        self.out1.append(out1)
        self.out2.append(out2)
        self.costs.append(1 + (len(chars.ranges) + len(chars.categories) if chars else 0))
        return len(self.kinds) - 1

    def build(self, node: Node, after: int) -> int:
        """The start state of ``node``, whose matches continue at ``after``."""
        if isinstance(node, Char):
            return self.add(_CHAR, after, chars=node.chars)
        if isinstance(node, Anchor):
            return self.add(_EOL if node.end else _BOL, after)
        if isinstance(node, Group):
            return self.build(node.item, after)
        if isinstance(node, Seq):
            for item in reversed(node.items):
                after = self.build(item, after)
            return after
        if isinstance(node, Alt):
            start = self.build(node.options[-1], after)
            for option in reversed(node.options[:-1]):
                start = self.add(_SPLIT, self.build(option, after), start)
            return start
        tail = after
        if node.max is None:
            loop = self.add(_SPLIT, -1, after)
            self.out1[loop] = self.build(node.item, loop)
            tail = loop
        else:
            for _ in range(node.max - node.min):
                tail = self.add(_SPLIT, self.build(node.item, tail), after)
        for _ in range(node.min):
            tail = self.build(node.item, tail)
        return tail

    def closure(
        self, starts: Iterable[int], *, bol: bool, eol: bool, budget: Budget
    ) -> frozenset[int]:
        """The consuming and final states reachable without input; an unmet "$" is kept
        (pending) so that the end of a name can still pass it."""
        seen: set[int] = set()
        kept: list[int] = []
        stack = list(starts)
        while stack:
            state = stack.pop()
            if state in seen:
                continue
            seen.add(state)
            kind = self.kinds[state]
            if kind == _SPLIT:
                stack += (self.out1[state], self.out2[state])
            elif kind == _BOL:
                if bol:
                    stack.append(self.out1[state])
            elif kind == _EOL and eol:
                stack.append(self.out1[state])
            else:
                kept.append(state)
        budget.spend(len(seen))
        return frozenset(kept)


class _Dfa:
    """The NFA's subset construction, built only as far as the names walked need.

    A DFA state is a set of NFA states: those that read a character, the final one, and
    each "$" not yet passed (so that the end of a name can still pass it).
    """

    def __init__(self, nfa: _Nfa, budget: Budget) -> None:
        self.nfa = nfa
        self.budget = budget
        self.sets: list[frozenset[int]] = []
        self.ids: dict[frozenset[int], int] = {}
        self.moves: list[dict[str, int]] = []
        self.final: list[bool] = []
        self.ends: dict[int, bool] = {}
        self.start = self.state(nfa.closure([nfa.start], bol=True, eol=False, budget=budget))

    def state(self, states: frozenset[int]) -> int:
        known = self.ids.get(states)
        if known is None:
            self.budget.spend(STATE_COST)
            known = self.ids[states] = len(self.sets)
            self.sets.append(states)
            self.moves.append({})
            self.final.append(any(self.nfa.kinds[s] == _MATCH for s in states))
        return known

    def step(self, state: int, char: str) -> int:
        move = self.moves[state].get(char)
        if move is None:
            nfa = self.nfa
            states = self.sets[state]
            self.budget.spend(sum(nfa.costs[s] for s in states))
            targets = [
                nfa.out1[s]
                for s in states
                if nfa.kinds[s] == _CHAR and char in nfa.chars[s]  # type: ignore[operator]
            ]
            move = self.state(nfa.closure(targets, bol=False, eol=False, budget=self.budget))
            self.moves[state][char] = move
        return move

    def ends_here(self, state: int, at_start: bool) -> bool:
        """Whether a name that ends in ``state`` matches: "$" holds at a name's end."""
        if not at_start and state in self.ends:
            return self.ends[state]
        closed = self.nfa.closure(self.sets[state], bol=at_start, eol=True, budget=self.budget)
        ends = any(self.nfa.kinds[s] == _MATCH for s in closed)
        if not at_start:
            self.ends[state] = ends
        return ends


class _TrieNode:
    __slots__ = ("children", "name")

    def __init__(self) -> None:
        self.children: dict[str, _TrieNode] = {}
        self.name: str | None = None


def _trie(names: Iterable[str], *, backward: bool) -> _TrieNode:
    root = _TrieNode()
    for name in names:
        node = root
        for char in reversed(name) if backward else name:
            node = node.children.setdefault(char, _TrieNode())
        node.name = name
    return root


class ModuleNames:
    """A fixed set of module names as tries, so that patterns walk shared parts once.

    Names are read forwards for a full match, and backwards for PEFT's suffix match, where
    the shared part is the end (``...q_proj``) and a walk stops where a key's end differs.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(names)
        # "$" also holds before a final newline; module names have none, so it holds
        # exactly at a name's end, and a name read backwards can hold "^" and "$" swapped.
        if any("\n" in name for name in self.names):
            raise ValueError("module names hold no newline")

    @cached_property
    def forward(self) -> _TrieNode:
        return _trie(self.names, backward=False)

    @cached_property
    def backward(self) -> _TrieNode:
        return _trie(self.names, backward=True)


def _names_below(node: _TrieNode, budget: Budget) -> Iterable[str]:
    stack = [node]
    while stack:
        node = stack.pop()
        budget.spend(1)
        if node.name is not None:
            yield node.name
        stack.extend(node.children.values())


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled pattern; ``whole``: it must match a whole name, else a prefix of one;
    ``backward``: it is matched against the names read backwards."""

    text: str
    nfa: _Nfa
    whole: bool
    backward: bool

    def matching(self, names: ModuleNames, budget: Budget) -> set[str]:
        """The names the pattern matches."""
        dfa = _Dfa(self.nfa, budget)
        found: set[str] = set()
        stack = [(names.backward if self.backward else names.forward, dfa.start, True)]
        while stack:
            node, state, at_start = stack.pop()
            if not self.whole and dfa.final[state]:
                # A match of a prefix: every name below matches.
                found.update(_names_below(node, budget))
                continue
            if node.name is not None and dfa.ends_here(state, at_start):
                found.add(node.name)
            budget.spend(len(node.children))
            for char, child in node.children.items():
                move = dfa.step(state, char)
                if dfa.sets[move]:
                    stack.append((child, move, False))
        return found


def _parse(text: str, what: str, budget: Budget) -> Node:
    def refused(reason: str, *, invalid: bool = False) -> UnsupportedAdapterError:
        shown = text if len(text) <= 80 else text[:77] + "..."
        if invalid:
            return UnsupportedAdapterError(
                f"unsupported adapter: {what} {shown!r} is not a valid regular expression "
                f"({reason})"
            )
        return UnsupportedAdapterError(
            f"unsupported adapter: {what} {shown!r} is refused ({reason}); {_SUBSET}"
        )

    if len(text) > MAX_PATTERN_CHARS:
        raise refused(f"longer than {MAX_PATTERN_CHARS} characters")
    budget.spend(PATTERN_COST + PARSE_COST * len(text))
    try:
        node = parse(text)
    except Refused as error:
        raise refused(str(error), invalid=error.invalid) from None
    if node_size(node) > MAX_NFA_STATES:
        raise refused("it expands to too many states; use fewer or smaller repeats")
    return node


def _compile(text: str, node: Node, budget: Budget, *, whole: bool, backward: bool) -> Pattern:
    budget.spend(node_size(node))
    nfa = _Nfa()
    nfa.start = nfa.build(node, nfa.add(_MATCH))
    return Pattern(text, nfa, whole, backward)


def fullmatch_pattern(text: str, what: str, budget: Budget) -> Pattern:
    """``re.fullmatch(text, name)``: PEFT's target_modules or exclude_modules as a string."""
    return _compile(text, _parse(text, what, budget), budget, whole=True, backward=False)


@dataclass(frozen=True, slots=True)
class _FixedSuffix:
    """A key of single characters and "." only, perhaps anchored, as PEFT writes when it
    names modules one by one (``model.layers.0.self_attn.q_proj``): matched by walking the
    backward trie along the key, with no automaton."""

    text: str
    chars: tuple[str | None, ...]  # the key backwards; None stands for "."
    whole: bool  # the key began with "^": a name matches only as a whole

    def matching(self, names: ModuleNames, budget: Budget) -> set[str]:
        nodes = [names.backward]
        for char in self.chars:
            budget.spend(len(nodes))
            if char is None:
                nodes = [child for node in nodes for child in node.children.values()]
            else:
                nodes = [child for node in nodes if (child := node.children.get(char))]
        found = {node.name for node in nodes if node.name is not None}
        if not self.whole:
            for node in nodes:
                if (dot := node.children.get(".")) is not None:
                    found.update(_names_below(dot, budget))
        return found


def _fixed(node: Node) -> tuple[tuple[str | None, ...], bool] | None:
    """A pattern that is "^"s, then single characters and ".", then "$"s: its characters and
    whether it began with "^"; else None."""
    items = list(node.items) if isinstance(node, Seq) else [node]
    whole = False
    while items and isinstance(items[0], Anchor) and not items[0].end:
        items.pop(0)
        whole = True
    while items and isinstance(items[-1], Anchor) and items[-1].end:
        items.pop()
    chars: list[str | None] = []
    for item in items:
        if not isinstance(item, Char):
            return None
        if item.chars == ANY:
            chars.append(None)
        elif (char := item.chars.single) is not None:
            chars.append(char)
        else:
            return None
    return tuple(reversed(chars)), whole


_DOT = Char(CharSet(chars=frozenset(".")))


def suffix_pattern(key: str, what: str, budget: Budget) -> Pattern | _FixedSuffix:
    r"""``re.match(rf"(.*\.)?({key})$", name)``: PEFT's get_pattern_key for one key.

    That is: a dotted suffix of the name matches the key. Read backwards, the name starts
    with a match of the reversed key followed by its end or a dot (after which ``.*``
    takes anything), which a walk of the backward trie decides at the key's length. A key
    that parses alone means inside PEFT's group what it means alone; one that does not
    (``a)|(b``) is refused.
    """
    if len(key) <= MAX_PATTERN_CHARS and _META.isdisjoint(key):
        budget.spend(len(key))
        chars = tuple(None if char == "." else char for char in reversed(key))
        return _FixedSuffix(key, chars, whole=False)
    node = _parse(key, what, budget)
    if (fixed := _fixed(node)) is not None:
        # "$" at the key's end adds nothing to PEFT's own; "^" at its start leaves no
        # room for the dotted prefix.
        return _FixedSuffix(key, *fixed)
    node = Seq((Group(reverse(node)), Alt((Anchor(end=True), _DOT))))
    return _compile(key, node, budget, whole=False, backward=True)
