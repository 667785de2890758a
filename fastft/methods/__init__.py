"""Recipes for fine-tuning methods: each a config (where it has options) and functions that change what a model
trains, built only from fastft.nn, fastft.losses and the public functions (fastft.nf4, fastft.qat, ...).

- adapters.py: bottleneck adapters added to transformers models (add / set_active / save / load / remove).
- qat.py: quantization-aware fine-tuning, `prepare` (nn.Linear -> FakeQuantLinear) and `convert` (-> QuantizedLinear).
- quantize.py: `quantize_model`, a model's linear layers to 4-bit NF4Linear.
- distillation.py: the distillation loss of a causal LM against a teacher and its Trainer.
- freeze.py: full / partial fine-tuning, `freeze` (top k layers or name patterns + the head trainable; the frozen
  part optionally 4-bit and run without autograd below the lowest trainable layer).
- optim_in_backward.py: AdamW stepped per parameter inside backward (gradients freed as they are produced; no
  global clipping, no accumulation), with a helper for HF Trainer.
- preference.py: DPO's losses (every TRL loss_type) and KTO's on per-token log-probabilities; reference_free.py:
  ORPO and CPO / SimPO / AlphaPO; grpo.py: GRPO's policy loss (every TRL loss_type); each also from hidden states
  + head weight through fastft::fused_linear_logprobs (no logits).
- upft.py: unsupervised prefix fine-tuning, self-sampled prefixes (cached) + collator.
- continual.py: EWC (Fisher estimation, online / per-task, the fused penalty pass, EWCTrainer); replay.py: a
  reservoir replay buffer and collator; expansion.py: an adapter per task over a frozen base.
- multitask.py: per-sample routed LoRA / bottleneck adapters, task heads, loss weighting, task sampling.
- domain_adaptation.py: DANN (gradient reversal, schedule, domain classifier, training step), domain adapters.

The submodules load on first use (the distillation Trainer imports transformers); the public paths fastft.adapters,
fastft.qat, fastft.quantize_model and fastft.integrations.distillation re-export them.
"""
