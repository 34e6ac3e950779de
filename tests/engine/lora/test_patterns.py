"""The bounded matcher gives ``re``'s answers on the subset it takes, in bounded work."""

from __future__ import annotations

import random
import re
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.patterns import (
    MAX_PATTERN_CHARS,
    PARSE_COST,
    PATTERN_COST,
    STATE_COST,
    Budget,
    ModuleNames,
    fullmatch_pattern,
    suffix_pattern,
)
from loramux_engine.lora.peft_config import _layer_index, resolve_peft_config
from loramux_engine.lora.shape import PROJECTIONS, BaseModelShape

SHAPE = BaseModelShape(
    num_layers=12, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8
)
MODULES = [key for _, _, key in SHAPE.projection_keys()] + list(SHAPE.other_module_keys())
NAMES = ModuleNames(MODULES)

TARGETS = [
    r".*\.(q_proj|v_proj)",
    "model.layers.*.self_attn.(q|k|v)_proj",
    r".*layers\.1\..*_proj",
    r".*\.mlp\.(gate|down)_proj",
    r"model\.layers\.(1[01]|[0-3])\.(self_attn|mlp)\.\w+_proj",
    r"^model\.layers\.\d+\.mlp\.[^.]*$",
    r"(?:.*\.)?(q|k)_proj",
    ".*",
    "model",
    r"model.layers.[13579].*",
    r".*_proj|lm_head",
]
KEYS = [
    "q_proj",
    "^model.layers.0.mlp.down_proj",
    "model.layers.0.self_attn.q_proj",
    "layers.1.mlp.up_proj",
    "layers.0.*q_proj",
    "self_attn.(q|v)_proj",
    r"layers\.1[0-9]?\.mlp\..*",
    "mlp.*",
    "proj",
    "_proj$",
    "^q_proj",
    ".",
    "",
    "|",
    "lm_head|down_proj",
]


def re_fullmatch(pattern: str) -> set[str]:
    return {name for name in MODULES if re.fullmatch(pattern, name)}


def re_suffix(key: str) -> set[str]:
    return {name for name in MODULES if re.match(rf"(.*\.)?({key})$", name)}


@pytest.mark.parametrize("pattern", TARGETS)
def test_fullmatch_equals_re_on_module_names(pattern: str) -> None:
    assert fullmatch_pattern(pattern, "target_modules", Budget()).matching(
        NAMES, Budget()
    ) == re_fullmatch(pattern)


@pytest.mark.parametrize("key", KEYS)
def test_suffix_equals_peft_get_pattern_key_regex(key: str) -> None:
    budget = Budget()
    assert suffix_pattern(key, "rank_pattern key", budget).matching(NAMES, budget) == re_suffix(key)


# --- random patterns from the subset, and random text over the pattern alphabet ---

ATOMS = ["a", "b", "q", "_", r"\.", ".", r"\d", r"\w", r"\s", r"\W", "[ab]", "[^a.]", "[a-q_]"]
ATOMS += [r"[\d.]", "[]a]", "[a-]", "0", "1", "x", "}", "]", "-", ",", r"\-", "{", "{x}"]


def random_pattern(rng: random.Random, depth: int = 0) -> str:
    """A pattern of the subset, ``re`` syntax throughout."""
    parts = []
    for _ in range(rng.randint(0, 4)):
        roll = rng.random()
        if roll < 0.15 and depth < 3:
            inner = "|".join(random_pattern(rng, depth + 1) for _ in range(rng.randint(1, 3)))
            item = rng.choice(["(%s)", "(?:%s)"]) % inner
        elif roll < 0.2:
            parts.append(rng.choice(["^", "$"]))
            continue
        else:
            item = rng.choice(ATOMS)
        if rng.random() < 0.4:
            item += rng.choice(["*", "+", "?", "{2}", "{0,2}", "{1,}", "{,3}", "{,}"])
            item += rng.choice(["", "", "?"])
        parts.append(item)
    return "".join(parts)


def random_texts(rng: random.Random) -> list[str]:
    """Short texts over the patterns' alphabet: re backtracks on them, but not for long."""
    texts = ["", "a", "q", "a.b", "ab_0", "x}", "a-b", "{x}", "q_proj", "mlp.up"]
    for _ in range(24):
        texts.append("".join(rng.choice("ab.q_0x1 -,]}{") for _ in range(rng.randint(1, 8))))
    return texts


def matching(pattern: str, texts: list[str], *, suffix: bool) -> set[str]:
    budget = Budget()
    compiled = (
        suffix_pattern(pattern, "key", budget)
        if suffix
        else fullmatch_pattern(pattern, "target_modules", budget)
    )
    return compiled.matching(ModuleNames(texts), budget)


def test_random_subset_patterns_equal_re() -> None:
    rng = random.Random(1234)
    for _ in range(1000):
        pattern = random_pattern(rng)
        texts = random_texts(rng)
        expected = {text for text in texts if re.fullmatch(pattern, text)}
        assert matching(pattern, texts, suffix=False) == expected, pattern
        expected = {text for text in texts if re.match(rf"(.*\.)?({pattern})$", text)}
        assert matching(pattern, texts, suffix=True) == expected, pattern


def re_compiles(pattern: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what re warns about changing, we refuse
        try:
            re.compile(pattern)
        except (re.error, FutureWarning, OverflowError, RecursionError):
            return False
    return True


def test_random_text_as_a_pattern_is_refused_or_means_what_re_says() -> None:
    """Any string: we refuse it, or re compiles it and matches exactly the same names."""
    rng = random.Random(99)
    alphabet = "ab.q_*+?{}[]()|^$\\-,0123d:P<>=!#x"
    accepted = 0
    for _ in range(4000):
        pattern = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
        texts = random_texts(rng)
        try:
            ours = matching(pattern, texts, suffix=False)
        except UnsupportedAdapterError:
            continue
        accepted += 1
        assert re_compiles(pattern), pattern
        assert ours == {text for text in texts if re.fullmatch(pattern, text)}, pattern
    assert accepted > 300  # the fuzzing reached the matcher, not only the parser


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", r"escape \\1 is not supported"),
        ("(?=q)q_proj", r"only \(...\) and \(\?:...\) groups"),
        ("(?!k)._proj", "only"),
        ("(?<=q)_proj", "only"),
        ("(?i)Q_PROJ", "only"),
        ("(?P<name>q)_proj", "only"),
        ("(?P=name)", "only"),
        ("(?>q)_proj", "only"),
        ("(?#comment)q", "only"),
        ("q_proj*+", "possessive"),
        (r"\bq_proj", r"escape \\b is not supported"),
        (r"\x71_proj", r"escape \\x is not supported"),
        (r"\N{LATIN SMALL LETTER Q}", r"escape \\N"),
        ("a{65}", "repeat counts above 64"),
        ("((a{64}){64}){64}", "too many states"),
        ("q" * (MAX_PATTERN_CHARS + 1), "longer than"),
        ("(" * 40 + ")" * 40, "nested over"),
        ("[[a]]", "nested sets"),
        ("[a--]", "-- in a set"),
        ("[a&&b]", "&& in a set"),
        ("(q_proj", "not a valid regular expression"),
        ("q_proj)", "not a valid regular expression"),
        ("*q", "nothing to repeat"),
        ("^*", "nothing to repeat"),
        ("a**", "multiple repeat"),
        ("a{3,1}", "min repeat greater"),
        ("[z-a]", "bad character range"),
        (r"[\d-z]", "bad character range"),
        ("q\\", "backslash"),
        (r"\q", r"bad escape \\q"),
    ],
)
def test_outside_the_subset_is_refused_with_a_reason(pattern: str, reason: str) -> None:
    with pytest.raises(UnsupportedAdapterError, match=reason):
        fullmatch_pattern(pattern, "target_modules", Budget())
    with pytest.raises(UnsupportedAdapterError, match=reason):
        suffix_pattern(pattern, "rank_pattern key", Budget())


EVIL = [r"(a+)+$", r"(x|x)*y", r"(.*)*z", r"(a|aa)*b", r"(.*a){20}", r"((a*)*)*b", r"(\w+\.?)*!"]


@pytest.mark.parametrize("pattern", EVIL)
def test_catastrophic_patterns_take_work_linear_in_the_text(pattern: str) -> None:
    """A bound of (text length + 2) x (a DFA state's cost) however the pattern nests."""
    for length in (10, 100, 1000):
        text = "a" * length + "."
        budget = Budget()
        compiled = fullmatch_pattern(pattern, "target_modules", budget)
        assert compiled.matching(ModuleNames([text]), budget) == set()
        size = len(compiled.nfa.kinds)
        bound = PATTERN_COST + PARSE_COST * len(pattern) + size
        bound += (length + 3) * (STATE_COST + 3 * size + 1)
        assert budget.spent <= bound, (pattern, length, budget.spent, bound)


def test_the_budget_refuses_work_past_its_limit() -> None:
    """What exceeds the budget is refused, never run on: a count, not a clock."""
    budget = Budget(limit=500)
    compiled = fullmatch_pattern(r"(.*a){20}", "target_modules", budget)
    with pytest.raises(UnsupportedAdapterError, match="too much work"):
        compiled.matching(ModuleNames(["b" * 1000]), budget)
    assert budget.spent <= 500 + STATE_COST + 3 * len(compiled.nfa.kinds) + 1


def test_a_config_of_catastrophic_patterns_resolves_without_re(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every place a tenant's pattern goes, none reaches re (which would backtrack)."""

    def no_re(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"re was called with {args}")

    evil = "(" * 12 + "a*" + ")*" * 12 + "$"
    configs: list[dict[str, Any]] = [
        {"target_modules": r".*\.(q|q)*q_proj|" + evil},
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r"(.*)*\.q_proj|" + evil},
        {"target_modules": "all-linear", "rank_pattern": {evil: 2, "(x+x+)+y": 3}},
        {"target_modules": "all-linear", "alpha_pattern": {evil: 2}},
        {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    ]
    outcomes: list[tuple[str, ...] | str] = []
    with monkeypatch.context() as patched:
        patched.setattr(re, "_compile", no_re)
        for config in configs:
            try:
                resolved = resolve_peft_config({"peft_type": "LORA", **config}, SHAPE, 16)
                outcomes.append(resolved.target_projections)
            except UnsupportedAdapterError as error:
                outcomes.append(str(error))
    assert outcomes[0] == ("q_proj",)
    assert outcomes[1] == ("v_proj",)
    assert outcomes[2] == outcomes[3] == tuple(sorted(PROJECTIONS))
    assert outcomes[4] == ("q_proj",)


def test_peft_plain_key_per_module_fits_the_budget_on_a_large_model() -> None:
    """EVA writes one rank_pattern key per module; 80 layers of them resolve."""
    shape = BaseModelShape(
        num_layers=80, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8
    )
    keys = [key for _, _, key in shape.projection_keys()]
    config = {
        "peft_type": "LORA",
        "target_modules": "all-linear",
        "rank_pattern": {key: 1 + i % 8 for i, key in enumerate(keys)},
        "alpha_pattern": {key: 2.0 for key in keys},
    }
    resolved = resolve_peft_config(config, shape, 16)
    assert [resolved.targets[(layer, p)].rank for layer, p, _ in shape.projection_keys()] == [
        1 + i % 8 for i in range(len(keys))
    ]


# --- whole configs: the same targets, ranks and scales as PEFT's own functions ---

CONFIGS: list[dict[str, Any]] = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r".*\.(q_proj|v_proj)"},
    {"target_modules": "model.layers.*.self_attn.(q|k|v)_proj", "r": 4, "lora_alpha": 8},
    {
        "target_modules": ["q_proj", "down_proj", "up_proj"],
        "rank_pattern": {"q_proj": 4, "^model.layers.0.mlp.down_proj": 8},
        "alpha_pattern": {"layers.1[01].*": 3, "down_proj": 5},
    },
    {"target_modules": "all-linear", "exclude_modules": ["k_proj", "layers.3.mlp.up_proj"]},
    {"target_modules": "all-linear", "exclude_modules": r".*\.(q|down)_proj"},
    {"target_modules": r".*layers\.1\d?\..*_proj", "exclude_modules": r".*\.mlp\..*"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0, 5, 11]},
    {"target_modules": ["o_proj"], "layers_to_transform": 3, "layers_pattern": "layers"},
    {"target_modules": ["v_proj"], "layers_to_transform": [2], "layers_pattern": ["h", "layers"]},
    {"target_modules": ["v_proj"], "layers_to_transform": [2], "layers_pattern": "blocks"},
    {"target_modules": ["self_attn.q_proj"], "rank_pattern": {"layers.0.*q_proj": 1}},
    {"target_modules": "all-linear", "rank_pattern": {"(q|k)_proj": 2, ".*": 6}},
]


def peft_view(config: dict[str, Any]) -> dict[tuple[int, str], tuple[int, float]]:
    """(layer, projection) -> (rank, scale) by PEFT's check_target_module_exists and
    get_pattern_key (which run re: these configs are ours, not a tenant's)."""
    settings = SimpleNamespace(
        target_modules=config["target_modules"],
        exclude_modules=config.get("exclude_modules"),
        layers_to_transform=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"),
        modules_to_save=None,
        target_parameters=None,
    )
    if settings.target_modules == "all-linear":
        settings.target_modules = [key for _, _, key in SHAPE.projection_keys()]
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    ranks, alphas = config.get("rank_pattern", {}), config.get("alpha_pattern", {})
    found = {}
    for layer, projection, key in SHAPE.projection_keys():
        if check_target_module_exists(settings, key):
            rank = ranks.get(get_pattern_key(ranks.keys(), key), r)
            found[(layer, projection)] = (
                rank,
                alphas.get(get_pattern_key(alphas, key), alpha) / rank,
            )
    return found


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_configs_resolve_as_peft_resolves_them(config: dict[str, Any]) -> None:
    expected = peft_view(config)
    if not expected:
        with pytest.raises(UnsupportedAdapterError, match="match none"):
            resolve_peft_config({"peft_type": "LORA", **config}, SHAPE, 16)
        return
    resolved = resolve_peft_config({"peft_type": "LORA", **config}, SHAPE, 16)
    assert {key: (t.rank, t.scale) for key, t in resolved.targets.items()} == expected
    assert len(resolved.target_module_keys) == len(expected)


LAYER_KEYS = [
    "model.layers.3.self_attn.q_proj",
    "model.layers.12.mlp.down_proj",
    "layers.4.x",
    "layers.4",
    "a.layers.5.b.layers.6.c",
    "transformer.h.7.attn.c_attn",
    "x.h.12.y.h.3.z",
    "model.blocks.0.mlp",
    "model.layers.x.3.q",
    "model.layers.03.q",
    "model.layers..4.q",
    "layerslayers.4.q",
    "m.layers.4a.q.7.r",
    "model.layers.\u0663.q",  # an Arabic-Indic digit: re's \d takes it, and so do we
]


@pytest.mark.parametrize("key", LAYER_KEYS)
def test_layer_index_as_peft_finds_it(key: str) -> None:
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    assert _layer_index(key, []) == (int(match.group("idx")) if match else None)
    for names in (["layers"], ["h"], ["blocks", "layers"], ["h", "layers"], ["x"]):
        match = None
        for name in names:
            match = re.match(rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
        assert _layer_index(key, names) == (int(match.group("idx")) if match else None)


@pytest.mark.parametrize(
    "layers_pattern", ["lay(ers)+", "layers|h", "h.0", ["layers", "(a+)+$"], 3]
)
def test_layers_pattern_must_be_plain_names(layers_pattern: Any) -> None:
    config = {
        "peft_type": "LORA",
        "target_modules": ["q_proj"],
        "layers_to_transform": [0],
        "layers_pattern": layers_pattern,
    }
    with pytest.raises(UnsupportedAdapterError, match="layers_pattern must name"):
        resolve_peft_config(config, SHAPE, 16)
