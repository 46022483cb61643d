"""LoRA through PEFT: start-up checks, wrapping, the reference model for free, merged weights.

Every training script has the same flags (--use_peft, --lora_r, --lora_alpha, --lora_dropout, --lora_target_modules,
--lora_modules_to_save, --merge_adapter) and the same three calls:

    peft_utils.check_args(args)                        # start-up, before any model loads or anything is written
    model = peft_utils.maybe_wrap(model, args)         # a PeftModel with --use_peft, else the model unchanged
    ref_model = peft_utils.reference_model(model)      # the same weights with the adapters switched off

A LoRA layer computes W x + (alpha / r) · B A dropout(x) with W frozen, A (r, d_in) random and B (d_out, r) zero at
the start (Hu et al., arXiv 2106.09685), so the wrapped model starts exactly where the base model is, and the base
model is always one `disable_adapter()` away: methods that need a frozen reference run the policy with its adapters
off instead of holding a second copy (`reference_model`). The ~0.1-10% of parameters that train (A, B and the
`--lora_modules_to_save` copies, e.g. a reward model's `score` head) are the only ones the optimizer holds state for.

Saving (common/checkpoint.py): the final model folder is an adapter folder (adapter_config.json +
adapter_model.safetensors + tokenizer; `PeftModel.from_pretrained(base, folder)`), with --merge_adapter also
`output_dir/merged/` (W + s·B·A, loadable with plain `from_pretrained`). Checkpoints hold the adapter weights, not the
frozen base (the base comes back from --model_name_or_path on resume). vLLM receives the merged weights
(`merged_state_dict`, computed without touching the model, so training never sees merge/unmerge rounding).
"""

from __future__ import annotations

import contextlib

import torch

TASKS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
         "TOKEN_CLS": "AutoModelForTokenClassification"}  # peft task types -> the transformers classes they wrap
LORA_KEYS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")
SAVED_KEYS = LORA_KEYS + (".modules_to_save.",)  # the parameters a PeftModel adds; everything else is the frozen base


def is_peft_model(model) -> bool:
    """A peft PeftModel (after unwrapping DDP / DeepSpeed: pass `accelerator.unwrap_model(model)`)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def target_modules(args):
    """--lora_target_modules as peft takes it: 'all-linear' (None or the word itself) or a list of name suffixes."""
    names = list(args.lora_target_modules or [])
    return "all-linear" if not names or names == ["all-linear"] else names


# ----------------------------------------------------------------------------- start-up checks
def _meta_model(name: str, task: str, dataset_name: str):
    """The model's module tree on the meta device (no weights allocated, nothing read but config.json)."""
    import transformers
    from transformers import AutoConfig

    from common import model as model_utils, toy

    if name in model_utils.TOY_CONFIGS:
        config = toy.make_config(toy.make_tokenizer(), **model_utils.TOY_CONFIGS[name])
    else:
        config = AutoConfig.from_pretrained(model_utils.resolve(name, dataset_name))
    auto = getattr(transformers, TASKS[task])
    if task != "CAUSAL_LM":
        config.num_labels = 1
    with torch.device("meta"):
        return auto.from_config(config)


def _module_summary(model) -> str:
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    other = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n} - set(linear))
    return f"linear layers: {', '.join(linear) or 'none'}; other modules: {', '.join(o for o in other if not o.isdigit())}"


def check_module_names(model, args, task: str = "CAUSAL_LM", what: str = "--model_name_or_path") -> None:
    """Every name of --lora_target_modules / --lora_modules_to_save must match a module of `model` (peft's rules: a
    target is the module's full name or its last dotted parts; a module to save, any end of the full name, so 'norm'
    also takes every '*_layernorm': write 'model.norm'); target modules must be linear or embedding layers."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, _ in model.named_modules() if n]
    modules = dict(model.named_modules())

    def matches(key, flag="--lora_target_modules"):  # peft's rules: a dotted suffix; modules_to_save: any suffix
        if flag == "--lora_modules_to_save":
            return [n for n in names if n.endswith(key)]
        return [n for n in names if n == key or n.endswith("." + key)]

    targets = target_modules(args)
    for flag, keys in (("--lora_target_modules", [] if targets == "all-linear" else targets),
                       ("--lora_modules_to_save", list(args.lora_modules_to_save or []))):
        for key in keys:
            found = matches(key, flag)
            if not found:
                raise ValueError(f"{flag} {key}: no module of {what} ({type(model).__name__}) has that name. Its "
                                 f"{_module_summary(model)}. Give names from this list (or leave "
                                 f"--lora_target_modules unset for every linear layer)")
            if flag == "--lora_target_modules":
                bad = [n for n in found if not isinstance(modules[n], (torch.nn.Linear, torch.nn.Embedding, Conv1D))]
                if bad:
                    raise ValueError(f"--lora_target_modules {key}: matches {bad[0]}, a {type(modules[bad[0]]).__name__}"
                                     f"; LoRA goes on linear or embedding layers. {_module_summary(model)}")
    if task == "CAUSAL_LM" and getattr(model.config, "tie_word_embeddings", False) and targets != "all-linear" \
            and any(matches(k) for k in targets if k in ("embed_tokens", "lm_head", "wte")):
        raise ValueError(f"--lora_target_modules {' '.join(targets)}: the model ties its input embedding and its LM "
                         "head, and an adapter on one of them would untie them; leave them out (or put them in "
                         "--lora_modules_to_save)")


def check_args(args, task: str = "CAUSAL_LM", model_name: str | None = None, what: str = "--model_name_or_path"):
    """Start-up checks of the LoRA flags (call before any model loads and before prepare_output_dir): the numbers,
    and the module names against the model's module tree built on the meta device from its config. Nothing to do
    without --use_peft."""
    if not getattr(args, "use_peft", False):
        return
    if args.lora_r <= 0:
        raise ValueError(f"--lora_r {args.lora_r}: the LoRA rank must be a positive integer (e.g. 16)")
    if args.lora_alpha <= 0:
        raise ValueError(f"--lora_alpha {args.lora_alpha}: must be positive (the update is scaled by alpha / r)")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout {args.lora_dropout}: must be in [0, 1)")
    if getattr(args, "sync_ref_model", False):
        raise ValueError("--sync_ref_model (TR-DPO) mixes the policy's weights into the reference, but with --use_peft "
                         "the reference is the frozen base under the adapters: drop one of the two")
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise ImportError("--use_peft needs the peft package: pip install -r requirements.txt") from e
    name = model_name or args.model_name_or_path
    check_module_names(_meta_model(name, task, getattr(args, "dataset_name", "toy:add")), args, task, what)


# ----------------------------------------------------------------------------- wrapping
def maybe_wrap(model, args, task: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    """With --use_peft: `model` as a peft PeftModel with LoRA adapters (A random, B = 0: the same function as
    `model`), only the adapters and the --lora_modules_to_save modules trainable. task 'CAUSAL_LM' or 'SEQ_CLS'
    (a one-output reward / value model: its `score` head is trained fully and saved with the adapter). Without
    --use_peft: `model` unchanged. 'TOKEN_CLS' (a token classifier, e.g. a process reward model) trains its `score`
    head fully too. Call before building the optimizer and before accelerator.prepare."""
    if not getattr(args, "use_peft", False):
        return model
    from peft import LoraConfig, get_peft_model

    if task not in TASKS:
        raise ValueError(f"maybe_wrap: task must be one of {', '.join(TASKS)}, got {task!r}")
    check_module_names(model, args, task)
    save = list(dict.fromkeys(list(args.lora_modules_to_save or []) + list(modules_to_save or [])
                              + (["score"] if task != "CAUSAL_LM" else [])))
    targets = target_modules(args)
    if targets == "all-linear" and task != "CAUSAL_LM":  # every linear layer but the head (trained fully instead)
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in save})
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, modules_to_save=list(save) or None, task_type=task)
    wrapped = get_peft_model(model, config)
    wrapped.cleanalign_merge_on_save = bool(getattr(args, "merge_adapter", False))  # read by checkpoint.save_model
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    layers = sorted(wrapped.peft_config["default"].target_modules)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"LoRA: r={args.lora_r}, alpha={args.lora_alpha}, dropout={args.lora_dropout} on {', '.join(layers)}"
              f"{'; trained fully: ' + ', '.join(save) if save else ''}; {trainable:,} of {total:,} parameters train "
              f"({100 * trainable / total:.2f}%)", flush=True)
    return wrapped


# ----------------------------------------------------------------------------- the reference model for free
class AdapterOffModel:
    """The base model inside a PeftModel: calls run the policy's own modules with its adapters switched off
    (peft's `disable_adapter()`) and in eval mode (no dropout), then put both back. Holds no weights of its own, so a
    reference model costs no memory. `eval()`, `train()`, `to()` and `requires_grad_()` are no-ops (they would
    otherwise reach the policy); `parameters()` and `modules()` are the policy's (for device lookups and dropout
    switches that apply to both)."""

    training = False

    def __init__(self, peft_model):
        self.peft_model = peft_model

    @contextlib.contextmanager
    def adapters_off(self):
        m = self.peft_model
        was_training = m.training
        m.eval()
        try:
            with m.disable_adapter():
                yield m
        finally:
            m.train(was_training)

    def __call__(self, *args, **kwargs):
        with self.adapters_off() as m:
            return m(*args, **kwargs)

    forward = __call__

    def generate(self, *args, **kwargs):
        with self.adapters_off() as m:
            return m.generate(*args, **kwargs)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def to(self, *args, **kwargs):
        return self

    def requires_grad_(self, requires_grad: bool = True):
        return self

    def parameters(self, recurse: bool = True):
        return self.peft_model.parameters(recurse)

    def modules(self):
        return self.peft_model.modules()

    @property
    def config(self):
        return self.peft_model.config

    @property
    def device(self):
        return next(self.peft_model.parameters()).device


def reference_model(model) -> AdapterOffModel:
    """The reference model for free: `model` (a PeftModel, before or after accelerator.prepare) with its adapters
    switched off. Use it where a script would use a frozen copy of the starting policy."""
    m = getattr(model, "module", model)  # DDP keeps the PeftModel under .module; DeepSpeed's engine too
    if not is_peft_model(m):
        raise TypeError(f"reference_model needs a PeftModel (from peft_utils.maybe_wrap with --use_peft), got "
                        f"{type(m).__name__}")
    return AdapterOffModel(m)


# ----------------------------------------------------------------------------- merged weights
def _delta(layer, a: torch.Tensor, b: torch.Tensor, adapter: str) -> torch.Tensor:
    """s · B A of one LoRA layer from its A and B tensors (the layer's own scaling and fan_in_fan_out), in W's layout."""
    out_dtype = b.dtype
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    delta = b @ a
    if getattr(layer, "fan_in_fan_out", False):
        delta = delta.T
    return (delta * layer.scaling[adapter]).to(out_dtype)


def merged_state_dict(peft_model, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The base model's state dict with the adapters merged, under the base model's own parameter names: each LoRA
    layer's weight is W + s·B·A, each --lora_modules_to_save module is its trained copy. Computed from `state` (the
    PeftModel's state dict, e.g. gathered under ZeRO-3; default: peft_model.state_dict()) without changing the model.
    Tensors that need no change are the model's own (not copies)."""
    from peft.tuners.lora import LoraLayer

    state = peft_model.state_dict() if state is None else state
    adapter = peft_model.active_adapter
    prefix = "base_model.model."
    lora_layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if any(k in key for k in LORA_KEYS) or ".original_module." in key:
            continue
        if f".modules_to_save.{adapter}." in key:
            key = key.replace(f".modules_to_save.{adapter}.", ".")
        elif ".modules_to_save." in key:
            continue  # another adapter's copy
        out[key.replace(".base_layer.", ".").removeprefix(prefix)] = value
    for name, layer in lora_layers.items():
        if getattr(layer, "merged", False):
            raise RuntimeError(f"{name}: the adapter is merged into the weights in place; unmerge it first")
        clean = name.removeprefix(prefix)
        if f"{name}.lora_A.{adapter}.weight" in state:
            a, b = state[f"{name}.lora_A.{adapter}.weight"], state[f"{name}.lora_B.{adapter}.weight"]
            out[f"{clean}.weight"] = out[f"{clean}.weight"] + _delta(layer, a, b, adapter)
        elif f"{name}.lora_embedding_A.{adapter}" in state:  # embedding: A (r, V), B (d, r); W is (V, d)
            a, b = state[f"{name}.lora_embedding_A.{adapter}"], state[f"{name}.lora_embedding_B.{adapter}"]
            out[f"{clean}.weight"] = out[f"{clean}.weight"] + (b @ a).T.to(b.dtype) * layer.scaling[adapter]
    return out


def save_merged(peft_model, out_dir, state: dict | None = None) -> None:
    """Write the merged model (W + s·B·A, plain transformers weights and config) to out_dir; the model is unchanged."""
    peft_model.get_base_model().save_pretrained(out_dir, state_dict=merged_state_dict(peft_model, state),
                                                safe_serialization=True)


# ----------------------------------------------------------------------------- checkpoint state
def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of a PeftModel: the adapter weights and the modules_to_save copies (not the frozen
    base, which comes back from --model_name_or_path)."""
    return {k: v for k, v in peft_model.state_dict().items() if any(s in k for s in SAVED_KEYS)}


def load_adapter_state(peft_model, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Put `adapter_state` tensors back; every adapter tensor of the model must be in `state` and nothing else."""
    expected = set(adapter_state(peft_model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: the adapter weights do not fit this model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); resume with the same --lora_r / --lora_target_modules / "
                         f"--lora_modules_to_save")
    with torch.no_grad():
        own = peft_model.state_dict()
        for k, v in state.items():
            own[k].copy_(v.to(own[k].device))
