r"""The syntax of module name patterns: the subset of ``re`` the bounded matcher takes.

A recursive-descent parser that reads a pattern exactly as ``re``'s own parser
(``re._parser``) does, for the subset in :mod:`.patterns`, and refuses everything else,
telling apart what ``re`` would not compile either (``Refused.invalid``). It never runs the
pattern; :mod:`.patterns` compiles the tree it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_NESTING = 32
MAX_REPEAT = 64

_ESCAPES = {"a": "\a", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_CATEGORIES = "dDwWsS"


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
class CharSet:
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


ANY = CharSet(negate=True, chars=frozenset("\n"))


@dataclass(frozen=True, slots=True)
class Char:
    chars: CharSet


@dataclass(frozen=True, slots=True)
class Anchor:
    end: bool  # "$" if true, else "^"


@dataclass(frozen=True, slots=True)
class Group:
    item: Node


@dataclass(frozen=True, slots=True)
class Seq:
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Alt:
    options: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Repeat:
    item: Node
    min: int
    max: int | None


Node = Char | Anchor | Group | Seq | Alt | Repeat
# An escape, in or out of a class: ("lit", char) or ("cat", one of _CATEGORIES).
_Escape = tuple[str, str]


def parse(text: str) -> Node:
    """The tree of ``text``, or :class:`Refused` with the reason."""
    return _Parser(text).parse()


class _Parser:
    """A recursive-descent parser that accepts a pattern only as ``re`` would read it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    def refuse(self, reason: str) -> Refused:
        return Refused(reason, invalid=False)

    def invalid(self, reason: str) -> Refused:
        return Refused(reason, invalid=True)

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

    def parse(self) -> Node:
        node = self.alternation()
        if self.pos < len(self.text):
            raise self.invalid("unbalanced parenthesis")
        return node

    def alternation(self) -> Node:
        options = [self.sequence()]
        while self.take("|"):
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Alt(tuple(options))

    def sequence(self) -> Node:
        items: list[Node] = []
        while (char := self.peek()) is not None and char not in "|)":
            self.pos += 1
            if char in "*+?{":
                bounds = self.quantifier(char)
                if bounds is None:  # a "{" that starts no quantifier is a literal, as in re
                    items.append(Char(CharSet(chars=frozenset(char))))
                    continue
                if not items or isinstance(items[-1], Anchor):
                    raise self.invalid("nothing to repeat")
                if isinstance(items[-1], Repeat):
                    raise self.invalid("multiple repeat")
                if self.peek() == "+":
                    raise self.refuse("possessive quantifiers are not supported")
                self.take("?")  # lazy: the same texts match
                items[-1] = Repeat(items[-1], *bounds)
            elif char == "\\":
                items.append(Char(_as_set(self.escape())))
            elif char == "[":
                items.append(Char(self.char_class()))
            elif char == ".":
                items.append(Char(ANY))
            elif char in "^$":
                items.append(Anchor(end=char == "$"))
            elif char == "(":
                items.append(self.group())
            else:
                items.append(Char(CharSet(chars=frozenset(char))))
        return items[0] if len(items) == 1 else Seq(tuple(items))

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

    def char_class(self) -> CharSet:
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
        return CharSet(
            negate,
            frozenset(value for kind, value in items if kind == "lit"),
            tuple(ranges),
            "".join(value for kind, value in items if kind == "cat"),
        )

    def group(self) -> Node:
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
        return Group(item)


class Refused(Exception):
    """A pattern outside the subset (``invalid``: one ``re`` would not compile either)."""

    def __init__(self, reason: str, *, invalid: bool) -> None:
        super().__init__(reason)
        self.invalid = invalid


def _as_set(escape: _Escape) -> CharSet:
    kind, value = escape
    return CharSet(categories=value) if kind == "cat" else CharSet(chars=frozenset(value))


def node_size(node: Node) -> int:
    """The NFA states that patterns._Nfa.build makes for ``node``."""
    if isinstance(node, Char | Anchor):
        return 1
    if isinstance(node, Group):
        return node_size(node.item)
    if isinstance(node, Seq):
        return sum(node_size(item) for item in node.items)
    if isinstance(node, Alt):
        return sum(node_size(option) for option in node.options) + len(node.options) - 1
    item = node_size(node.item)
    optional = item + 1 if node.max is None else (node.max - node.min) * (item + 1)
    return node.min * item + optional


def reverse(node: Node) -> Node:
    """The pattern of the reversed texts; "^" and "$" trade places (no text ends in a newline)."""
    if isinstance(node, Char):
        return node
    if isinstance(node, Anchor):
        return Anchor(end=not node.end)
    if isinstance(node, Group):
        return Group(reverse(node.item))
    if isinstance(node, Seq):
        return Seq(tuple(reverse(item) for item in reversed(node.items)))
    if isinstance(node, Alt):
        return Alt(tuple(reverse(option) for option in node.options))
    return Repeat(reverse(node.item), node.min, node.max)
