"""``get_peft_model`` / ``LoraModel``: put LoRA layers into a model in place, as PEFT does, with PEFT's matching
rules, trainable-parameter marks and counts.

Everything is checked before the model is touched: a config that matches nothing, a target of a type fastlora
cannot wrap, or an adapter file that does not fit raises and leaves the model as it was.
"""
from __future__ import annotations

import copy
import re
import sys
import warnings
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch
import torch.nn as nn

from .config import INCLUDE_LINEAR_LAYERS_SHORTHAND, LoraConfig
from .layers import LoRAEmbedding, LoRALinear

__all__ = ["get_peft_model", "LoraModel", "ModulesToSaveWrapper"]

# PEFT's default targets for a transformers model whose config.model_type is listed (the nn.Linear-based ones).
DEFAULT_TARGET_MODULES = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neo": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"], "falcon": ["query_key_value"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"], "codegen": ["qkv_proj"],
}
# Heads that PEFT's task-specific model classes add to modules_to_save.
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
              "QUESTION_ANS": ["qa_outputs"]}
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


# --------------------------------------------------------------------------------------------------------------
# Matching (PEFT's rules: peft.tuners.tuners_utils.check_target_module_exists and friends)
# --------------------------------------------------------------------------------------------------------------

def _pretrained_model_class():
    tf = sys.modules.get("transformers")  # a transformers model implies transformers is already imported
    return getattr(tf, "PreTrainedModel", None) if tf is not None else None


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _all_linear_names(model: nn.Module, task_type: Optional[str]) -> set[str]:
    """Every nn.Linear (and transformers Conv1D) but the output layer, as PEFT's "all-linear" decides it."""
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}
    pretrained = _pretrained_model_class()
    if pretrained is not None and isinstance(model, pretrained):
        head = model.get_output_embeddings()
        if head is not None:
            names.discard(next(n for n, m in model.named_modules() if m is head))
        elif task_type == "SEQ_CLS":
            for attr in SEQ_CLS_HEAD_NAMES:
                cls_head = getattr(model, attr, None)
                if cls_head is not None:
                    names.discard(next(n for n, m in model.named_modules() if m is cls_head))
                    break
    return names


class _Excluded:
    """A 'no' that remembers it came from exclude_modules / modules_to_save (PEFT's _ExcludedModule)."""

    def __bool__(self):
        return False


def target_matches(config: LoraConfig, key: str):
    """PEFT's check_target_module_exists for a resolved config: truthy if module ``key`` is a LoRA target."""
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return _Excluded()
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return _Excluded()
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return _Excluded()
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    return any(key.endswith(f".{t}") for t in targets)


def pattern_key(patterns, key: str) -> Optional[str]:
    """The first rank_pattern / alpha_pattern key that matches module ``key`` (PEFT's get_pattern_key)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return None


def resolve_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """A copy of ``config`` with task heads added to modules_to_save and target_modules made concrete (model-type
    default for None, the list of linear layers for "all-linear"). The caller's config is not changed."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a fastlora.LoraConfig, got {type(config).__name__}")
    cfg = replace(config, rank_pattern=dict(config.rank_pattern), alpha_pattern=dict(config.alpha_pattern))
    if cfg.modules_to_save is not None:
        cfg.modules_to_save = list(cfg.modules_to_save)
    heads = TASK_HEADS.get(cfg.task_type or "")
    if heads:
        cfg.modules_to_save = (cfg.modules_to_save or []) + [h for h in heads]
    if cfg.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        default = DEFAULT_TARGET_MODULES.get(model_type)
        if default is None:
            raise ValueError(
                f"LoraConfig.target_modules is None and there is no default for model_type={model_type!r}: "
                "pass target_modules (a list of module names, a regex, or 'all-linear')")
        cfg.target_modules = set(default)
    elif isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        cfg.target_modules = _all_linear_names(model, cfg.task_type)
    else:
        cfg.target_modules = cfg.target_modules if isinstance(cfg.target_modules, str) else set(cfg.target_modules)
    return cfg


def _describe_targets(cfg: LoraConfig) -> str:
    t = cfg.target_modules
    return repr(t) if isinstance(t, str) else repr(sorted(t))


def _is_plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _is_plain_embedding(m: nn.Module) -> bool:
    return isinstance(m, nn.Embedding) and type(m).forward is nn.Embedding.forward


@dataclass
class _Target:
    name: str
    module: nn.Module
    r: int
    lora_alpha: float


@dataclass
class _Plan:
    config: LoraConfig
    targets: list
    modules_to_save: list


def plan_injection(model: nn.Module, config: LoraConfig) -> _Plan:
    """Decide every replacement without touching the model; raise on anything that would fail half-way."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    existing = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding, ModulesToSaveWrapper))]
    if existing:
        raise ValueError(f"the model already has fastlora adapter layers ({', '.join(existing[:5])}); unload() them "
                         "first: fastlora holds one adapter per model")
    cfg = resolve_config(model, config)
    named = [(n, m) for n, m in model.named_modules() if n]
    targets, excluded, unmatched, unsupported = [], [], [], []
    for name, module in named:
        hit = target_matches(cfg, name)
        if isinstance(hit, _Excluded):
            excluded.append(name)
        elif not hit:
            unmatched.append(name)
        elif _is_plain_linear(module) or _is_plain_embedding(module):
            r = cfg.rank_pattern.get(pattern_key(cfg.rank_pattern, name) or name, cfg.r)
            alpha = cfg.alpha_pattern.get(pattern_key(cfg.alpha_pattern, name) or name, cfg.lora_alpha)
            targets.append(_Target(name, module, r, alpha))
        else:
            why = ("a Conv1D layer (fan_in_fan_out weight layout), which fastlora does not wrap"
                   if _is_conv1d(module) else
                   "a subclass with its own forward" if isinstance(module, (nn.Linear, nn.Embedding)) else
                   "not an nn.Linear or nn.Embedding")
            unsupported.append(f"{name} ({type(module).__name__}: {why})")
    if unsupported:
        raise ValueError("target_modules matched modules that fastlora cannot adapt (it wraps nn.Linear and "
                         "nn.Embedding): " + "; ".join(unsupported[:10])
                         + (f" and {len(unsupported) - 10} more" if len(unsupported) > 10 else ""))
    if not targets:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n, m in named if not list(m.children())})
        searched = (f"target_modules={_describe_targets(cfg)}, exclude_modules={cfg.exclude_modules!r}, "
                    f"modules_to_save={cfg.modules_to_save!r}")
        if excluded and not unmatched:
            head = "all modules matched by target_modules were excluded"
        elif excluded:
            shown = ", ".join(excluded[:8]) + (" ..." if len(excluded) > 8 else "")
            head = ("no module is left to adapt: the matches, if any, were excluded by exclude_modules or "
                    f"modules_to_save (excluded: {shown})")
        else:
            head = "no module of the model matches the LoRA targets"
        raise ValueError(f"{head}: searched {len(named)} module names with {searched}. The model's leaf modules "
                         f"are named: {', '.join(leaf_names[:40])}" + (" ..." if len(leaf_names) > 40 else ""))
    if cfg.exclude_modules and not excluded:
        warnings.warn(f"exclude_modules={cfg.exclude_modules!r} excluded no module; check its spelling")
    target_names = [t.name for t in targets]
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(cfg, attr)
        unused = sorted(p for p in patterns if not any(re.match(rf"(.*\.)?({p})$", n) for n in target_names))
        if unused:
            warnings.warn(f"{attr} keys matched no targeted module and are ignored: {unused}", RuntimeWarning)

    saved = []
    if cfg.modules_to_save:
        for name, _ in model.named_modules(remove_duplicate=False):
            if name and any(name.endswith(m) for m in cfg.modules_to_save if m):
                saved.append(name)
        for s in saved:
            inner = [t for t in target_names if t == s or t.startswith(s + ".")]
            if inner:
                raise ValueError(f"modules_to_save entry matches {s!r}, which is or holds the LoRA target(s) "
                                 f"{inner[:5]}; fastlora does not put LoRA layers inside modules_to_save")
            nested = [o for o in saved if o != s and o.startswith(s + ".")]
            if nested:
                raise ValueError(f"modules_to_save matches both {s!r} and modules inside it ({nested[:5]}): list "
                                 "only one of them")
    return _Plan(cfg, targets, saved)


def _parent_and_child(model: nn.Module, name: str):
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


# --------------------------------------------------------------------------------------------------------------
# modules_to_save
# --------------------------------------------------------------------------------------------------------------

class ModulesToSaveWrapper(nn.Module):
    """A module trained in full: a trainable copy runs, the frozen original is kept (PEFT keeps both, and counts
    both). Attributes not found here come from the trainable copy."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.trainable_module = copy.deepcopy(module)
        self.original_module.requires_grad_(False)
        self.trainable_module.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.trainable_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "trainable_module"):
                raise
            return getattr(self.trainable_module, name)


# --------------------------------------------------------------------------------------------------------------
# LoraModel
# --------------------------------------------------------------------------------------------------------------

def _apply_plan(model: nn.Module, plan: _Plan, *, trainable: bool = True) -> tuple[dict, dict]:
    """Replace the planned targets and wrap modules_to_save, then mark what trains as PEFT marks it."""
    cfg = plan.config
    layers: dict[str, tuple[nn.Module, nn.Module]] = {}
    for t in plan.targets:
        if isinstance(t.module, nn.Linear):
            layer = LoRALinear.from_linear(t.module, r=t.r, lora_alpha=t.lora_alpha, lora_dropout=cfg.lora_dropout,
                                           use_rslora=cfg.use_rslora, init_lora_weights=cfg.init_lora_weights)
        else:
            layer = LoRAEmbedding.from_embedding(t.module, r=t.r, lora_alpha=t.lora_alpha,
                                                 use_rslora=cfg.use_rslora, init_lora_weights=cfg.init_lora_weights)
        layer.train(t.module.training)
        parent, child = _parent_and_child(model, t.name)
        setattr(parent, child, layer)
        layers[t.name] = (layer, t.module)

    # PEFT's order: freeze all but the adapters, then open the biases, then wrap modules_to_save.
    adapters = {id(p) for layer, _ in layers.values() for p in (layer.lora_A, layer.lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters and trainable)
    if trainable and cfg.bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    elif trainable and cfg.bias == "lora_only":
        for layer, _ in layers.values():
            if getattr(layer, "bias", None) is not None:
                layer.bias.requires_grad_(True)

    saved: dict[str, ModulesToSaveWrapper] = {}
    for name in plan.modules_to_save:
        parent, child = _parent_and_child(model, name)
        wrapper = ModulesToSaveWrapper(getattr(parent, child))
        if not trainable:
            wrapper.trainable_module.requires_grad_(False)
        setattr(parent, child, wrapper)
        saved[name] = wrapper
    return layers, saved


class LoraModel(nn.Module):
    """A model with LoRA layers put in place (``get_peft_model``'s result). Forward and unknown attributes go to
    the wrapped model, which is changed in place; ``unload()`` / ``merge_and_unload()`` give it back."""

    def __init__(self, model: nn.Module, config: LoraConfig, *, _plan: Optional[_Plan] = None,
                 _trainable: bool = True):
        plan = _plan if _plan is not None else plan_injection(model, config)
        super().__init__()
        layers, saved = _apply_plan(model, plan, trainable=_trainable)
        self.model = model
        self.peft_config = {"default": plan.config}
        self.targeted_module_names = [t.name for t in plan.targets]
        self._lora_layers = layers        # name -> (LoRA layer, the original module it replaced)
        self._modules_to_save = saved     # name -> ModulesToSaveWrapper

    # -- delegation ---------------------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.model

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config["default"]

    def lora_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, LoRALinear | LoRAEmbedding) for every adapted layer, names as in the wrapped model."""
        for name, (layer, _) in self._lora_layers.items():
            yield name, layer

    # -- counts -------------------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts as PEFT counts them: each shared tensor once, the frozen originals of
        modules_to_save included."""
        trainable = total = 0
        for _, p in self.named_parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: "
              f"{100 * trainable / total:.4f}")

    # -- merge / unload -----------------------------------------------------------------------------------------
    def merge_adapter(self) -> None:
        """Fold every LoRA update into its base weight (forward then runs the plain layers)."""
        todo = [(name, layer) for name, layer in self.lora_layers() if not layer.merged]
        if not todo:
            warnings.warn("merge_adapter(): all adapters are already merged, nothing to do")
        for name, layer in todo:
            tied = self._tied_elsewhere(name, layer.weight)
            if tied:
                warnings.warn(f"merge_adapter(): {name}.weight is shared with {tied}, which change with it; "
                              "merge_and_unload() unties them instead")
        todo = [layer for _, layer in todo]
        for layer in todo:
            layer.merge()

    def unmerge_adapter(self) -> None:
        """Undo merge_adapter()."""
        todo = [layer for _, layer in self.lora_layers() if layer.merged]
        if not todo:
            warnings.warn("unmerge_adapter(): no adapter is merged, nothing to do")
        for layer in todo:
            layer.unmerge()

    def _tied_elsewhere(self, name: str, weight: torch.Tensor) -> list[str]:
        return [n for n, p in self.model.named_parameters(remove_duplicate=False)
                if p is weight and not n.startswith(name + ".")]

    def _unload(self, merge: bool) -> nn.Module:
        for name, (layer, original) in self._lora_layers.items():
            if merge and not layer.merged:
                tied = self._tied_elsewhere(name, layer.weight)
                if tied:
                    # merging in place would change the tied layers too (PEFT does that): untie, so the merged
                    # model computes what the adapted one did
                    layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
                    model_config = getattr(self.model, "config", None)
                    if getattr(model_config, "tie_word_embeddings", False):
                        model_config.tie_word_embeddings = False
                    warnings.warn(f"merge_and_unload(): {name}.weight was shared with {tied}; the merged layer now "
                                  "has its own copy (config.tie_word_embeddings set to False where present)")
                layer.merge()
            elif not merge and layer.merged:
                layer.unmerge()
            # the original module shares the layer's weight tensor(s): re-bind them in case they were replaced
            original.weight = layer.weight
            if isinstance(layer, LoRALinear):
                original.bias = layer.bias
            parent, child = _parent_and_child(self.model, name)
            setattr(parent, child, original)
        for name, wrapper in self._modules_to_save.items():
            parent, child = _parent_and_child(self.model, name)
            setattr(parent, child, wrapper.trainable_module)
        self._lora_layers = {}
        self._modules_to_save = {}
        self.targeted_module_names = []
        return self.model

    def merge_and_unload(self) -> nn.Module:
        """Merge every update into its base layer and put the original nn.Linear / nn.Embedding modules back (the
        trained copy for modules_to_save). Returns the model object that was passed in."""
        return self._unload(merge=True)

    def unload(self) -> nn.Module:
        """Put the original modules back without the LoRA update (a merged layer is unmerged first). Returns the
        model object that was passed in."""
        return self._unload(merge=False)

    # -- files --------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, save_embedding_layers="auto") -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format (see fastlora.adapters)."""
        from .adapters import save_adapter

        save_adapter(self, save_directory, save_embedding_layers=save_embedding_layers)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, is_trainable: bool = False) -> "LoraModel":
        """Load an adapter directory written by PEFT or fastlora onto ``model`` (see fastlora.adapters)."""
        from .adapters import load_adapter

        return load_adapter(model, model_id, is_trainable=is_trainable)


def get_peft_model(model: nn.Module, config: LoraConfig) -> LoraModel:
    """Replace the modules that ``config`` targets by LoRA layers, in place, freeze the rest (PEFT's marks for
    ``bias`` and ``modules_to_save``), and return the LoraModel that wraps ``model``."""
    return LoraModel(model, config)
