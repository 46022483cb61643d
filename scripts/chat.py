"""Talk to a saved run or model folder in the terminal.

    python scripts/chat.py --model_name_or_path runs/<run>                 # a finished run (or its checkpoint-N)
    python scripts/chat.py --model_name_or_path toy-sft --plain True       # the toy policy: type 12+34=
    python scripts/chat.py --model_name_or_path runs/<run> --prompt "12+34=" --temperature 0   # one answer, exit
    python scripts/chat.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --system "Be brief." --top_p 0.9

Prompts: the tokenizer's chat template when it has one (the whole conversation so far, with the generation prompt),
else plain continuation (also with --plain True): each input is continued on its own, after the /system text if one
is set. Sampling is the training scripts' (common/generation.py's settings: --temperature, --top_p, --top_k,
--min_p, --max_new_tokens; --temperature 0 is greedy; the model's own generation_config.json is not used except for
its EOS ids). The answer streams to stdout as it is generated; everything else goes to stderr, so the output of
`--prompt` (or of a piped stdin) is the answers alone, one per line.

Commands: /clear (forget the conversation), /system <text> (set the system prompt; /system alone removes it),
/save <file> (the conversation as one {"messages": [...]} JSON line: a language-modelling row of the project's
datasets), /exit (or Ctrl-D). A line starting with // sends the text after the first /.

A missing folder, a folder without a tokenizer or a model that fails to load is one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tyro

TOY_NAMES = ("toy-sft", "toy-sft-full")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
COMMANDS = "/clear, /system <text>, /save <file>, /exit"


@dataclass
class Args:
    model_name_or_path: str
    """a run folder (its final model), a checkpoint-N folder, a model folder, 'toy-sft' or a hub name"""
    dataset_name: str = "toy:add"
    """only for the toy names: the task whose cached toy model to load"""
    prompt: str | None = None
    """answer this one prompt and exit"""
    system: str | None = None
    """system prompt (chat template) or text put before every input (plain continuation)"""
    plain: bool = False
    """ignore the tokenizer's chat template: continue each input as typed"""
    temperature: float = 1.0
    """sampling temperature (0: greedy)"""
    top_p: float = 1.0
    """nucleus sampling"""
    top_k: int = 0
    """top-k sampling (0: off)"""
    min_p: float | None = None
    """min-p sampling"""
    max_new_tokens: int = 256
    """longest answer (also capped by the model's context length)"""
    seed: int = 1
    """random seed of the sampling"""
    dtype: str = "float32"
    """'float32', 'bfloat16' or 'float16'"""
    device: str | None = None
    """'cpu', 'cuda', ...; default: cuda when available"""


class ChatError(Exception):
    """A problem to report in one line (no traceback)."""


# ----------------------------------------------------------------------------- loading
def check_folder(name: str) -> None:
    """Fail early, before torch loads, for a folder that cannot hold a model: missing, a file, no tokenizer, no
    config (a run that did not finish: point at its checkpoints)."""
    path = Path(name).expanduser()
    looks_local = (path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
                   or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()))  # e.g. runs/<run>
    if not looks_local:
        return  # a hub name: from_pretrained decides
    if not path.exists():
        raise ChatError(f"--model_name_or_path {name}: no such folder ({path.resolve()})")
    if not path.is_dir():
        raise ChatError(f"--model_name_or_path {name}: a file, not a model folder (give the folder holding config.json)")
    checkpoints = sorted((p for p in path.glob("checkpoint-*") if (p / "config.json").exists()),
                         key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    if not (path / "config.json").exists():
        hint = (f"; its newest checkpoint is {checkpoints[-1]} (pass that folder)" if checkpoints else
                "; give a folder written by save_pretrained, e.g. a finished run's output_dir")
        raise ChatError(f"--model_name_or_path {name}: no config.json, so no saved model{hint}")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise ChatError(f"--model_name_or_path {name}: the folder has no tokenizer ({' / '.join(TOKENIZER_FILES[:2])});"
                        " save one there with tokenizer.save_pretrained(folder)")


def load(args: Args):
    """(tokenizer, model, device), or ChatError with the reason in one line."""
    check_folder(args.model_name_or_path)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:  # the hub client's retry warnings would come before our one line
        import huggingface_hub

        huggingface_hub.utils.logging.set_verbosity_error()
    except (ImportError, AttributeError):
        pass
    name = args.model_name_or_path
    if name in TOY_NAMES:
        from common.model import resolve

        name = resolve(name, args.dataset_name)
    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise ChatError(f"--dtype {args.dtype}: choose float32, bfloat16 or float16")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any failure is reported in one line
        raise ChatError(f"--model_name_or_path {args.model_name_or_path}: could not load its tokenizer "
                        f"({type(e).__name__}: {first_line(e)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, args.dtype))
    except Exception as e:  # noqa: BLE001
        raise ChatError(f"--model_name_or_path {args.model_name_or_path}: the model failed to load "
                        f"({type(e).__name__}: {first_line(e)})") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return tokenizer, model.to(device).eval(), device


def first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else "no message"


# ----------------------------------------------------------------------------- one answer
class Chat:
    def __init__(self, args: Args, tokenizer, model, device):
        self.args, self.tok, self.model, self.device = args, tokenizer, model, device
        self.use_template = not args.plain and tokenizer.chat_template is not None
        self.system = args.system
        self.history: list[dict] = []  # user / assistant turns (chat template), or the transcript (plain)

    def render(self, user: str) -> str:
        from common.data import prompt_text

        if self.use_template:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
            return self.tok.apply_chat_template(msgs + [{"role": "user", "content": user}], tokenize=False,
                                                add_generation_prompt=True)
        return prompt_text((self.system or "") + user, self.tok)

    def answer(self, user: str) -> str | None:
        """Stream the answer to stdout and return it (None when the prompt does not fit the context)."""
        import torch
        from transformers import GenerationConfig, TextStreamer

        ids = self.tok(self.render(user), add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        max_new = self.args.max_new_tokens
        if limit is not None:
            if ids.shape[1] >= limit:
                info(f"the conversation ({ids.shape[1]} tokens) does not fit the model's context of {limit} tokens: "
                     "/clear to start again")
                return None
            max_new = min(max_new, limit - ids.shape[1])
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        model_eos = self.model.generation_config.eos_token_id
        eos += [e for e in (model_eos if isinstance(model_eos, list) else [model_eos]) if e is not None and e not in eos]
        greedy = self.args.temperature == 0
        cfg = GenerationConfig(do_sample=not greedy, max_new_tokens=max_new, eos_token_id=eos or None,
                               pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else
                               (eos[0] if eos else None),
                               **({} if greedy else {"temperature": self.args.temperature, "top_p": self.args.top_p,
                                                     "top_k": self.args.top_k or None, "min_p": self.args.min_p}))
        streamer = TextStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        try:
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                                          streamer=streamer)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print(flush=True)
            info("(stopped)")
            return None
        text = self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return text

    def save(self, path: str):
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(path).expanduser().write_text(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
        info(f"saved {len(msgs)} messages to {path}")


def info(msg: str):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- main
def repl(chat: Chat):
    tty = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if tty else "")
        except (EOFError, KeyboardInterrupt):
            if tty:
                print(file=sys.stderr)
            return
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/") and not line.startswith("//"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/clear":
                chat.history = []
                info("(conversation cleared)")
            elif cmd == "/system":
                chat.system = rest.strip() or None
                info(f"(system prompt: {chat.system!r})" if chat.system else "(no system prompt)")
            elif cmd == "/save":
                if not rest.strip():
                    info("/save needs a file name: /save chat.jsonl")
                else:
                    try:
                        chat.save(rest.strip())
                    except OSError as e:
                        info(f"/save {rest.strip()}: {e.strerror or e}")
            else:
                info(f"unknown command {cmd}; commands: {COMMANDS} (start a message with // to send a '/')")
            continue
        chat.answer(line[1:] if line.startswith("//") else line)


def main(args: Args) -> int:
    try:
        tokenizer, model, device = load(args)
    except ChatError as e:
        print(f"chat.py: {e}", file=sys.stderr, flush=True)
        return 1
    import torch

    torch.manual_seed(args.seed)
    chat = Chat(args, tokenizer, model, device)
    if args.prompt is not None:
        return 0 if chat.answer(args.prompt) is not None else 1
    mode = "chat template" if chat.use_template else "plain continuation"
    info(f"chat.py: {args.model_name_or_path} on {device} ({mode}, temperature {args.temperature}); {COMMANDS}")
    repl(chat)
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args, use_underscores=True, config=(tyro.conf.FlagConversionOff,))))
