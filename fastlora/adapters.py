"""PEFT-format adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, written and read.

Key names are PEFT's (the adapter name ``default`` removed, as PEFT saves them), for a layer at path ``P`` of the
wrapped model::

    base_model.model.P.lora_A.weight        (r, in_features)        LoRALinear.lora_A
    base_model.model.P.lora_B.weight        (out_features, r)       LoRALinear.lora_B
    base_model.model.P.lora_embedding_A     (r, num_embeddings)     LoRAEmbedding.lora_A
    base_model.model.P.lora_embedding_B     (embedding_dim, r)      LoRAEmbedding.lora_B
    base_model.model.P.base_layer.bias      the adapted layer's bias (bias="lora_only" or "all")
    base_model.model.P.base_layer.weight    a targeted embedding's base table (PEFT saves it, see below)
    base_model.model.Q.<param>              a modules_to_save module Q (its trained copy), or any other bias
                                            (bias="all")

Tensors keep their dtype (fp32 adapters on a half-precision base, as PEFT keeps them). Nothing here runs unless
safetensors is installed; ``import fastlora`` does not need it.
"""
from __future__ import annotations

import json
import os
import re

import torch
import torch.nn as nn

from .config import INCLUDE_LINEAR_LAYERS_SHORTHAND, LoraConfig
from .layers import LoRAEmbedding, LoRALinear

__all__ = ["save_adapter", "load_adapter", "config_to_dict", "config_from_dict", "CONFIG_NAME",
           "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")

# adapter_config.json fields that only record provenance or settings irrelevant to loading trained weights
_BOOKKEEPING = {"peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
                "megatron_config", "megatron_core", "loftq_config", "qalora_group_size", "runtime_config",
                "eva_config", "corda_config", "lora_ga_config", "init_lora_weights"}


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading and writing adapter files needs safetensors: pip install safetensors "
                          "(or pip install fastlora[peft])") from e
    return st


# --------------------------------------------------------------------------------------------------------------
# adapter_config.json
# --------------------------------------------------------------------------------------------------------------

def _names_to_json(value):
    return value if value is None or isinstance(value, str) else sorted(value)


def config_to_dict(config: LoraConfig, base_model_name_or_path=None) -> dict:
    """The adapter_config.json of ``config``: the fields PEFT writes that fastlora's LoRA uses, with PEFT's
    values for the features fastlora does not have (so every PEFT version since rank patterns can read it)."""
    d = {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "target_modules": _names_to_json(config.target_modules),
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "fan_in_fan_out": False,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "modules_to_save": config.modules_to_save,
        "init_lora_weights": config.init_lora_weights,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "use_dora": False,
    }
    if config.exclude_modules is not None:  # written only when set: PEFT < 0.14 does not know the field
        d["exclude_modules"] = _names_to_json(config.exclude_modules)
    return d


def config_from_dict(d: dict, source: str = CONFIG_NAME) -> LoraConfig:
    """A LoraConfig from an adapter_config.json written by PEFT or fastlora. Raises ValueError for a non-LoRA
    adapter or one that uses a PEFT feature fastlora does not implement (DoRA, lora_bias, layers_to_transform...)."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    peft_type = d.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"{source}: peft_type is {peft_type!r}; fastlora loads LoRA adapters only")
    known = set(LoraConfig.field_names())
    unsupported = {k: v for k, v in d.items()
                   if k not in known and k not in _BOOKKEEPING and v not in (None, False, {}, [], "")}
    if unsupported:
        raise ValueError(f"{source} uses PEFT features that fastlora does not implement: "
                         + ", ".join(f"{k}={v!r}" for k, v in sorted(unsupported.items())))
    kwargs = {k: d[k] for k in known if k in d}
    init = kwargs.get("init_lora_weights", True)
    if not (init is True or init is False or init == "gaussian"):
        kwargs["init_lora_weights"] = True  # only an initialisation: the loaded weights replace it
    for key in ("rank_pattern", "alpha_pattern"):
        if kwargs.get(key) is None:
            kwargs[key] = {}
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


# --------------------------------------------------------------------------------------------------------------
# Key names
# --------------------------------------------------------------------------------------------------------------

def _embedding_is_targeted(config: LoraConfig, model: nn.Module) -> bool:
    """PEFT's test (save_and_load.get_peft_model_state_dict) for saving the base embedding tables."""
    targets = config.target_modules
    if isinstance(targets, str) and targets != INCLUDE_LINEAR_LAYERS_SHORTHAND:
        return any(re.fullmatch(targets, k) for k, _ in model.named_modules()
                   if any(re.match(rf"(.*\.)?{e}$", k) for e in EMBEDDING_LAYER_NAMES))
    if targets:
        return any(e in targets for e in EMBEDDING_LAYER_NAMES)
    return False


def _module_name(model: nn.Module, module) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _io_embeddings(model: nn.Module):
    out = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        if fn is None:
            continue
        try:
            out.append(fn())
        except (NotImplementedError, AttributeError):
            continue
    return out


def _lora_keys(name: str, layer) -> dict:
    """PEFT key -> the fastlora tensor, for one adapted layer."""
    p = PREFIX + name
    if isinstance(layer, LoRAEmbedding):
        return {f"{p}.lora_embedding_A": layer.lora_A, f"{p}.lora_embedding_B": layer.lora_B}
    return {f"{p}.lora_A.weight": layer.lora_A, f"{p}.lora_B.weight": layer.lora_B}


def adapter_state_dict(lora_model, save_embedding_layers="auto") -> dict:
    """{PEFT key: tensor} of everything PEFT would save for this adapter."""
    cfg = lora_model.active_peft_config
    model = lora_model.model
    layers = dict(lora_model.lora_layers())
    saved = lora_model._modules_to_save
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        out.update(_lora_keys(name, layer))
    if cfg.bias == "lora_only":
        for name, layer in layers.items():
            if getattr(layer, "bias", None) is not None:
                out[f"{PREFIX}{name}.base_layer.bias"] = layer.bias
    elif cfg.bias == "all":
        for n, p in model.named_parameters(remove_duplicate=False):
            if not (n == "bias" or n.endswith(".bias")):
                continue
            owner = n.rpartition(".")[0]
            if owner in layers:
                out[f"{PREFIX}{owner}.base_layer.bias"] = p
            elif not any(n.startswith(q + ".") for q in saved):
                out[PREFIX + n] = p
    for q, wrapper in saved.items():
        for k, v in wrapper.trainable_module.state_dict().items():
            out[f"{PREFIX}{q}.{k}"] = v
    targeted = _embedding_is_targeted(cfg, model)
    if save_embedding_layers == "auto":
        save_embedding_layers = targeted
    if save_embedding_layers:
        for module in _io_embeddings(model):
            is_lora = isinstance(module, (LoRALinear, LoRAEmbedding))
            if targeted and not is_lora:
                continue
            name = _module_name(model, module)
            if name is None:
                continue
            base = f"{PREFIX}{name}.base_layer." if is_lora else f"{PREFIX}{name}."
            out[base + "weight"] = module.weight
            if getattr(module, "bias", None) is not None:
                out[base + "bias"] = module.bias
    return out


# --------------------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------------------

def save_adapter(lora_model, save_directory, save_embedding_layers="auto") -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as ``peft.PeftModel.save_pretrained`` does,
    so that ``peft.PeftModel.from_pretrained(base, save_directory)`` loads them. ``save_embedding_layers``: "auto"
    (PEFT's default: save the base embedding tables when an embedding layer is targeted), True or False."""
    if save_embedding_layers not in ("auto", True, False):
        raise ValueError(f"save_embedding_layers must be 'auto', True or False, got {save_embedding_layers!r}")
    if not lora_model.targeted_module_names:
        raise ValueError("save_pretrained(): this LoraModel has no adapter layers (it was unloaded)")
    st = _safetensors()
    tensors, seen = {}, set()
    for key, t in adapter_state_dict(lora_model, save_embedding_layers).items():
        t = t.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ptr in seen:  # safetensors refuses tensors that share memory (tied biases, for one)
            t = t.clone()
        seen.add(ptr)
        tensors[key] = t
    name_or_path = getattr(getattr(lora_model.model, "config", None), "_name_or_path", None) or None
    d = config_to_dict(lora_model.active_peft_config, base_model_name_or_path=name_or_path)
    os.makedirs(save_directory, exist_ok=True)
    st.save_file(tensors, os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(json.dumps(d, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------------------

def _read_dir(model_id):
    if not isinstance(model_id, (str, os.PathLike)):
        raise TypeError(f"expected the path of an adapter directory, got {type(model_id).__name__}")
    path = os.fspath(model_id)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory: fastlora loads adapters from a local directory "
                                f"holding {CONFIG_NAME} and {SAFETENSORS_WEIGHTS_NAME} (download Hub adapters first)")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"adapter directory {path!r} has no {CONFIG_NAME}")
    try:
        with open(config_path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    config = config_from_dict(d, source=config_path)
    st_path = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
    bin_path = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(st_path):
        try:
            tensors = _safetensors().load_file(st_path)
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise ValueError(f"{st_path} could not be read as safetensors: {e}") from e
    elif os.path.isfile(bin_path):
        tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"adapter directory {path!r} has no {SAFETENSORS_WEIGHTS_NAME} (nor {WEIGHTS_NAME})")
    return config, tensors


def _expected_keys(model: nn.Module, plan):
    """From the plan (the model not yet changed): required {key: shape}, optional {key: shape}, and the prefixes
    of keys to ignore (the internals of PEFT's modules_to_save wrapper, which some PEFT versions also write)."""
    cfg = plan.config
    required, optional = {}, {}
    targets = {t.name: t.module for t in plan.targets}
    for name, m in targets.items():
        p = PREFIX + name
        if isinstance(m, nn.Embedding):
            required[f"{p}.lora_embedding_A"] = (targets_r(plan, name), m.num_embeddings)
            required[f"{p}.lora_embedding_B"] = (m.embedding_dim, targets_r(plan, name))
        else:
            required[f"{p}.lora_A.weight"] = (targets_r(plan, name), m.in_features)
            required[f"{p}.lora_B.weight"] = (m.out_features, targets_r(plan, name))
        optional[f"{p}.base_layer.weight"] = tuple(m.weight.shape)
        if getattr(m, "bias", None) is not None:
            bias_key = f"{p}.base_layer.bias"
            (required if cfg.bias != "none" else optional)[bias_key] = tuple(m.bias.shape)
    for q in plan.modules_to_save:
        for k, v in model.get_submodule(q).state_dict().items():
            required[f"{PREFIX}{q}.{k}"] = tuple(v.shape)
    ignored = tuple(f"{PREFIX}{q}.{inner}." for q in plan.modules_to_save
                    for inner in ("original_module", "modules_to_save"))

    def inside(n, names):
        return any(n == x or n.startswith(x + ".") for x in names)

    for n, v in model.state_dict().items():
        if inside(n, targets) or inside(n, plan.modules_to_save):
            continue
        if cfg.bias == "all" and (n == "bias" or n.endswith(".bias")):
            required[PREFIX + n] = tuple(v.shape)
        else:
            optional[PREFIX + n] = tuple(v.shape)
    return required, optional, ignored


def targets_r(plan, name: str) -> int:
    return next(t.r for t in plan.targets if t.name == name)


def _check_tensors(tensors: dict, required: dict, optional: dict, ignored: tuple, source: str) -> dict:
    tensors = {(k if k.startswith(PREFIX) else PREFIX + k): v for k, v in tensors.items()}
    missing = sorted(k for k in required if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in required and k not in optional and not k.startswith(ignored))
    expected = {**optional, **required}
    wrong = sorted(f"{k}: file {tuple(v.shape)}, model {expected[k]}" for k, v in tensors.items()
                   if k in expected and tuple(v.shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) that match nothing in the model: {', '.join(unexpected[:8])}"
                        + (" ..." if len(unexpected) > 8 else ""))
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:8])}" + (" ..." if len(wrong) > 8 else ""))
    if problems:
        raise ValueError(f"{source} does not fit this model and adapter_config.json (the model was not changed): "
                         + " | ".join(problems))
    return {k: v for k, v in tensors.items() if k in expected}


def load_adapter(model: nn.Module, model_id, is_trainable: bool = False):
    """Put the adapter saved in directory ``model_id`` (by PEFT or fastlora) onto ``model`` and return the
    LoraModel. Every file, key and shape is checked before the model is changed. ``is_trainable=False`` (PEFT's
    default) freezes the adapters and puts the model in eval mode."""
    from .model import LoraModel, plan_injection

    config, tensors = _read_dir(model_id)
    plan = plan_injection(model, config)
    required, optional, ignored = _expected_keys(model, plan)
    source = os.path.join(os.fspath(model_id), SAFETENSORS_WEIGHTS_NAME)
    tensors = _check_tensors(tensors, required, optional, ignored, source)

    lora_model = LoraModel(model, config, _plan=plan, _trainable=is_trainable)
    layers = dict(lora_model.lora_layers())
    dest: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        dest.update(_lora_keys(name, layer))
        dest[f"{PREFIX}{name}.base_layer.weight"] = layer.weight
        if getattr(layer, "bias", None) is not None:
            dest[f"{PREFIX}{name}.base_layer.bias"] = layer.bias
    for q, wrapper in lora_model._modules_to_save.items():
        for k, v in wrapper.trainable_module.state_dict(keep_vars=True).items():
            dest[f"{PREFIX}{q}.{k}"] = v
    plain = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in tensors.items():
            target = dest.get(key)
            if target is None:
                target = plain[key[len(PREFIX):]]
            target.copy_(value.to(device=target.device))
    if not is_trainable:
        lora_model.eval()
    return lora_model
