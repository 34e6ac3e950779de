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

MAX_PATTERN_CHARS = 512
MAX_NESTING = 32
MAX_REPEAT = 64
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

_ESCAPES = {"a": "\a", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_CATEGORIES = "dDwWsS"
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


def _in_category(category: str, char: str) -> bool:
    # As re's Unicode categories for str patterns: \d is isdecimal, \w isalnum or "_".
    kind = category.lower()
    if kind == "d":
        hit = char.isdecimal()
    elif kind == "w":
        hit = char.isalnum() or char == "_"
    else:
        hit = char.isspace()
    return hit != category.isupper()


@dataclass(frozen=True, slots=True)
class _CharSet:
    negate: bool = False
    chars: frozenset[str] = frozenset()
    ranges: tuple[tuple[str, str], ...] = ()
    categories: str = ""

    def __contains__(self, char: str) -> bool:
        if char in self.chars:
            hit = True
        else:
            hit = any(lo <= char <= hi for lo, hi in self.ranges) or any(
                _in_category(category, char) for category in self.categories
            )
        return hit != self.negate

    @property
    def single(self) -> str | None:
        """The one character this set is, if it is one literal."""
        if self.negate or self.ranges or self.categories or len(self.chars) != 1:
            return None
        return next(iter(self.chars))


_ANY = _CharSet(negate=True, chars=frozenset("\n"))


@dataclass(frozen=True, slots=True)
class _Char:
    chars: _CharSet


@dataclass(frozen=True, slots=True)
class _Anchor:
    end: bool  # "$" if true, else "^"


@dataclass(frozen=True, slots=True)
class _Group:
    item: _Node


@dataclass(frozen=True, slots=True)
class _Seq:
    items: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Alt:
    options: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Repeat:
    item: _Node
    min: int
    max: int | None


_Node = _Char | _Anchor | _Group | _Seq | _Alt | _Repeat
# An escape, in or out of a class: ("lit", char) or ("cat", one of _CATEGORIES).
_Escape = tuple[str, str]


class _Parser:
    """A recursive-descent parser that accepts a pattern only as ``re`` would read it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    def refuse(self, reason: str) -> _Refused:
        return _Refused(reason, invalid=False)

    def invalid(self, reason: str) -> _Refused:
        return _Refused(reason, invalid=True)

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def take(self, char: str) -> bool:
        if self.peek() == char:
            self.pos += 1
            return True
        return False

    def next(self, unterminated: str) -> str:
        char = self.peek()
        if char is None:
            raise self.invalid(unterminated)
        self.pos += 1
        return char

    def parse(self) -> _Node:
        node = self.alternation()
        if self.pos < len(self.text):
            raise self.invalid("unbalanced parenthesis")
        return node

    def alternation(self) -> _Node:
        options = [self.sequence()]
        while self.take("|"):
            options.append(self.sequence())
        return options[0] if len(options) == 1 else _Alt(tuple(options))

    def sequence(self) -> _Node:
        items: list[_Node] = []
        while (char := self.peek()) is not None and char not in "|)":
            self.pos += 1
            if char in "*+?{":
                bounds = self.quantifier(char)
                if bounds is None:  # a "{" that starts no quantifier is a literal, as in re
                    items.append(_Char(_CharSet(chars=frozenset(char))))
                    continue
                if not items or isinstance(items[-1], _Anchor):
                    raise self.invalid("nothing to repeat")
                if isinstance(items[-1], _Repeat):
                    raise self.invalid("multiple repeat")
                if self.peek() == "+":
                    raise self.refuse("possessive quantifiers are not supported")
                self.take("?")  # lazy: the same texts match
                items[-1] = _Repeat(items[-1], *bounds)
            elif char == "\\":
                items.append(_Char(_as_set(self.escape())))
            elif char == "[":
                items.append(_Char(self.char_class()))
            elif char == ".":
                items.append(_Char(_ANY))
            elif char in "^$":
                items.append(_Anchor(end=char == "$"))
            elif char == "(":
                items.append(self.group())
            else:
                items.append(_Char(_CharSet(chars=frozenset(char))))
        return items[0] if len(items) == 1 else _Seq(tuple(items))

    def quantifier(self, char: str) -> tuple[int, int | None] | None:
        if char != "{":
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        if self.peek() == "}":
            return None
        start = self.pos
        low = self.digits()
        high = self.digits() if self.take(",") else low
        if not self.take("}"):
            self.pos = start
            return None
        minimum = int(low) if low else 0
        maximum = int(high) if high else None
        if maximum is not None and maximum < minimum:
            raise self.invalid("min repeat greater than max repeat")
        if minimum > MAX_REPEAT or (maximum or 0) > MAX_REPEAT:
            raise self.refuse(f"repeat counts above {MAX_REPEAT} are not supported")
        return minimum, maximum

    def digits(self) -> str:
        start = self.pos
        while (char := self.peek()) is not None and char in "0123456789":
            self.pos += 1
        return self.text[start : self.pos]

    def escape(self) -> _Escape:
        char = self.next("a pattern may not end with a backslash")
        if char in _CATEGORIES:
            return "cat", char
        if char in _ESCAPES:
            return "lit", _ESCAPES[char]
        if char.isascii() and char.isalnum():
            if char.isdigit() or char in "xuUNbBAZ":
                raise self.refuse(f"the escape \\{char} is not supported")
            raise self.invalid(f"bad escape \\{char}")
        return "lit", char

    def char_class(self) -> _CharSet:
        if self.peek() == "[":
            raise self.refuse("nested sets are not supported")
        negate = self.take("^")
        items: list[_Escape] = []
        ranges: list[tuple[str, str]] = []
        while True:
            char = self.next("unterminated character set")
            if char == "]" and (items or ranges):
                break
            if char == "\\":
                item = self.escape()
            else:
                if (items or ranges) and char in "-&~|" and self.peek() == char:
                    raise self.refuse(f"{char * 2} in a set is not supported")
                item = ("lit", char)
            if not self.take("-"):
                items.append(item)
                continue
            end = self.next("unterminated character set")
            if end == "]":  # "[a-]": the "-" is a literal
                items += [item, ("lit", "-")]
                break
            if end == "-":
                raise self.refuse("-- in a set is not supported")
            high = self.escape() if end == "\\" else ("lit", end)
            if item[0] != "lit" or high[0] != "lit" or high[1] < item[1]:
                raise self.invalid("bad character range")
            ranges.append((item[1], high[1]))
        return _CharSet(
            negate,
            frozenset(value for kind, value in items if kind == "lit"),
            tuple(ranges),
            "".join(value for kind, value in items if kind == "cat"),
        )

    def group(self) -> _Node:
        if self.take("?") and not self.take(":"):
            raise self.refuse(
                "only (...) and (?:...) groups are supported (no lookaround, flags, "
                "named or atomic groups)"
            )
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.refuse(f"groups nested over {MAX_NESTING} deep are not supported")
        item = self.alternation()
        if not self.take(")"):
            raise self.invalid("missing ), unterminated subpattern")
        self.depth -= 1
        return _Group(item)


class _Refused(Exception):
    """A pattern outside the subset (``invalid``: one ``re`` would not compile either)."""

    def __init__(self, reason: str, *, invalid: bool) -> None:
        super().__init__(reason)
        self.invalid = invalid


def _as_set(escape: _Escape) -> _CharSet:
    kind, value = escape
    return _CharSet(categories=value) if kind == "cat" else _CharSet(chars=frozenset(value))


def _size(node: _Node) -> int:
    """NFA states that :meth:`_Nfa.build` makes for ``node``."""
    if isinstance(node, _Char | _Anchor):
        return 1
    if isinstance(node, _Group):
        return _size(node.item)
    if isinstance(node, _Seq):
        return sum(_size(item) for item in node.items)
    if isinstance(node, _Alt):
        return sum(_size(option) for option in node.options) + len(node.options) - 1
    item = _size(node.item)
    optional = item + 1 if node.max is None else (node.max - node.min) * (item + 1)
    return node.min * item + optional


_CHAR, _SPLIT, _BOL, _EOL, _MATCH = range(5)


@dataclass
class _Nfa:
    kinds: list[int] = field(default_factory=list)
    chars: list[_CharSet | None] = field(default_factory=list)
    out1: list[int] = field(default_factory=list)
    out2: list[int] = field(default_factory=list)
    # What testing a character against the state costs: its ranges and categories too.
    costs: list[int] = field(default_factory=list)
    start: int = -1

    def add(self, kind: int, out1: int = -1, out2: int = -1, chars: _CharSet | None = None) -> int:
        self.kinds.append(kind)
        self.chars.append(chars)
        self.out1.append(out1)
        self.out2.append(out2)
        self.costs.append(1 + (len(chars.ranges) + len(chars.categories) if chars else 0))
        return len(self.kinds) - 1

    def build(self, node: _Node, after: int) -> int:
        """The start state of ``node``, whose matches continue at ``after``."""
        if isinstance(node, _Char):
            return self.add(_CHAR, after, chars=node.chars)
        if isinstance(node, _Anchor):
            return self.add(_EOL if node.end else _BOL, after)
        if isinstance(node, _Group):
            return self.build(node.item, after)
        if isinstance(node, _Seq):
            for item in reversed(node.items):
                after = self.build(item, after)
            return after
        if isinstance(node, _Alt):
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


def _reverse(node: _Node) -> _Node:
    """The pattern of the reversed texts; "^" and "$" trade places (no text ends in a newline)."""
    if isinstance(node, _Char):
        return node
    if isinstance(node, _Anchor):
        return _Anchor(end=not node.end)
    if isinstance(node, _Group):
        return _Group(_reverse(node.item))
    if isinstance(node, _Seq):
        return _Seq(tuple(_reverse(item) for item in reversed(node.items)))
    if isinstance(node, _Alt):
        return _Alt(tuple(_reverse(option) for option in node.options))
    return _Repeat(_reverse(node.item), node.min, node.max)


def _parse(text: str, what: str, budget: Budget) -> _Node:
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
        node = _Parser(text).parse()
    except _Refused as error:
        raise refused(str(error), invalid=error.invalid) from None
    if _size(node) > MAX_NFA_STATES:
        raise refused("it expands to too many states; use fewer or smaller repeats")
    return node


def _compile(text: str, node: _Node, budget: Budget, *, whole: bool, backward: bool) -> Pattern:
    budget.spend(_size(node))
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


def _fixed(node: _Node) -> tuple[tuple[str | None, ...], bool] | None:
    """A pattern that is "^"s, then single characters and ".", then "$"s: its characters and
    whether it began with "^"; else None."""
    items = list(node.items) if isinstance(node, _Seq) else [node]
    whole = False
    while items and isinstance(items[0], _Anchor) and not items[0].end:
        items.pop(0)
        whole = True
    while items and isinstance(items[-1], _Anchor) and items[-1].end:
        items.pop()
    chars: list[str | None] = []
    for item in items:
        if not isinstance(item, _Char):
            return None
        if item.chars == _ANY:
            chars.append(None)
        elif (char := item.chars.single) is not None:
            chars.append(char)
        else:
            return None
    return tuple(reversed(chars)), whole


_DOT = _Char(_CharSet(chars=frozenset(".")))


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
    node = _Seq((_Group(_reverse(node)), _Alt((_Anchor(end=True), _DOT))))
    return _compile(key, node, budget, whole=False, backward=True)
