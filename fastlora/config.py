"""``LoraConfig``: PEFT's LoRA configuration, with PEFT's field names, defaults and checks."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import Optional, Union

__all__ = ["LoraConfig", "BIAS_MODES", "INCLUDE_LINEAR_LAYERS_SHORTHAND"]

BIAS_MODES = ("none", "all", "lora_only")
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _name_set(value, what: str):
    """None, a regex string, or an iterable of module names (kept as a set, as PEFT keeps it)."""
    if value is None or isinstance(value, str):
        return value
    try:
        names = set(value)
    except TypeError:
        raise TypeError(f"{what} must be None, a string or a list of strings, got {value!r}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{what} entries must be strings, got {bad!r}")
    return names


@dataclass
class LoraConfig:
    """LoRA settings, with PEFT's names and meaning (``peft.LoraConfig``'s subset that fastlora implements).

    - ``r``, ``lora_alpha``: rank and scale; the update is ``(lora_alpha / r) · B A`` (``lora_alpha / √r`` with
      ``use_rslora``). ``rank_pattern`` / ``alpha_pattern`` override them per module: a key matches a module name
      when ``re.match(rf"(.*\\.)?({key})$", name)`` does, the first matching key wins.
    - ``target_modules``: a list of names (a module matches if its full name equals an entry or ends with
      ``"." + entry``), a string (a regex that must match the full name), or ``"all-linear"`` (every nn.Linear but
      the model's output layer). None: PEFT's default for the model's ``config.model_type``.
    - ``exclude_modules``: same forms, removed from the targets. ``modules_to_save``: modules trained in full and
      saved with the adapter (a module matches if its name ends with an entry).
    - ``bias``: ``"none"``, ``"all"`` (every bias of the model trains) or ``"lora_only"`` (the biases of the
      adapted layers train).
    - ``init_lora_weights``: True (A kaiming-uniform, B zeros), ``"gaussian"`` (A ~ N(0, 1/r²), B zeros) or False
      (random B: the model changes, for tests). Embeddings: A zeros, B ~ N(0, 1).
    - ``lora_dropout``: dropout on the LoRA branch's input of linear layers (none on embeddings, as PEFT).
    - ``task_type``: as PEFT (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...); ``SEQ_CLS`` / ``TOKEN_CLS`` add ``classifier``
      and ``score`` to ``modules_to_save``, ``QUESTION_ANS`` adds ``qa_outputs``, as PEFT's model classes do.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    modules_to_save: Optional[list[str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    task_type: Optional[str] = None

    def __post_init__(self):
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        if not _is_number(self.lora_alpha):
            raise TypeError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be a float in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        if not (self.init_lora_weights is True or self.init_lora_weights is False
                or self.init_lora_weights == "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        self.target_modules = _name_set(self.target_modules, "target_modules")
        self.exclude_modules = _name_set(self.exclude_modules, "exclude_modules")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise TypeError(f"modules_to_save must be a list of strings, got the string {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
            bad = [m for m in self.modules_to_save if not isinstance(m, str)]
            if bad:
                raise TypeError(f"modules_to_save entries must be strings, got {bad!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise TypeError(f"{name} must be a dict of {{pattern: value}}, got {pattern!r}")
            setattr(self, name, dict(pattern))
        bad_r = {k: v for k, v in self.rank_pattern.items() if not _is_int(v) or v <= 0}
        if bad_r:
            raise ValueError(f"rank_pattern values must be positive ints, got {bad_r!r}")
        bad_a = {k: v for k, v in self.alpha_pattern.items() if not _is_number(v)}
        if bad_a:
            raise TypeError(f"alpha_pattern values must be numbers, got {bad_a!r}")
        if self.task_type is not None:
            # PEFT's TaskType is a str enum: keep its value
            self.task_type = str(getattr(self.task_type, "value", self.task_type))

    @property
    def peft_type(self) -> str:
        return "LORA"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
