"""HF Trainer on a model from fastlora.get_peft_model works as on PEFT's: default remove_unused_columns, adapter-only
checkpoints, resume_from_checkpoint, gradient checkpointing; per-step losses equal PEFT's within fp32 tolerance."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastlora  # noqa: E402
from model_helpers import assert_same  # noqa: E402

STEPS = 4


class _Data(torch.utils.data.Dataset):
    """Causal-LM examples with an extra column the model does not take (dropped by remove_unused_columns)."""

    def __init__(self, n=16, length=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 61, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i],
                "example_id": i}


def _base():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _train(make, out_dir, resume=None):
    """Per-step training losses (recorded from the forward, unrounded) and the trained model."""
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make(_base(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                              target_modules=["q_proj", "v_proj", "down_proj"],
                                              task_type="CAUSAL_LM"))
    losses = []
    model.register_forward_hook(lambda m, a, out: losses.append(out.loss.detach().clone()) if m.training else None)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=5e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=2, report_to="none",
        use_cpu=True, gradient_checkpointing=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return losses, model


def test_trainer_losses_checkpoints_and_resume_match_peft(tmp_path):
    losses_peft, model_peft = _train(peft.get_peft_model, tmp_path / "peft")
    losses_fast, model_fast = _train(fastlora.get_peft_model, tmp_path / "fast")
    assert isinstance(model_fast, peft.PeftModel)
    assert all(why is None for why in fastlora.fused_layers(model_fast).values())
    assert len(losses_fast) == len(losses_peft) == STEPS
    for step, (a, b) in enumerate(zip(losses_fast, losses_peft)):
        assert_same(a, b, 1e-5, 1e-5, f"loss at step {step + 1}")
    assert model_fast.get_base_model().is_gradient_checkpointing
    peft_state = dict(model_peft.named_parameters())
    for name, p in model_fast.named_parameters():
        if p.requires_grad:
            assert_same(p, peft_state[name], 1e-5, 1e-5, name)

    ckpt = tmp_path / "fast" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, files  # the adapter, not the full model

    losses_resumed, _ = _train(fastlora.get_peft_model, tmp_path / "fast", resume=str(ckpt))
    assert len(losses_resumed) == STEPS - 2
    for step, (a, b) in enumerate(zip(losses_resumed, losses_fast[2:])):
        assert_same(a, b, 1e-5, 1e-5, f"resumed loss at step {step + 3}")
