"""lmms-eval integration: evaluate a compressed model with `lmms-eval --model tokencompress`.

    pip install "tokencompress[lmms]"
    lmms-eval --model tokencompress \
        --model_args "pretrained=llava-hf/llava-1.5-7b-hf,compressor=fastv,layer=2,keep=0.5" \
        --tasks mme --batch_size 8

lmms-eval (>= 0.6) finds the model through the Python entry point group `lmms_eval.models`
(pyproject.toml: `tokencompress = "tokencompress.lmms_eval_model:lmms_eval_manifest"`), which returns a
`ModelManifest` naming `TokenCompressLMM` as the simple (non-chat) model class "tokencompress".

model_args (comma-separated key=value, as lmms-eval parses them):
  pretrained           a Hugging Face model id or a local directory, loaded with AutoModelForImageTextToText and
                       AutoProcessor (required)
  compressor           a registered compressor name (tc.registry(): fastv, random, mustdrop, dpn, gamma_mod,
                       static_pyramid, ...) or `none` for the uncompressed baseline (default: none)
  compressor_dir       a directory written by tc.save_pretrained (pipeline config and trained router weights),
                       re-applied with tc.from_pretrained; instead of `compressor` and its parameters
  device               default: cuda (cuda:LOCAL_RANK under accelerate launch) if available, else cpu
  batch_size           prompts per generate call (default 1); batches are left-padded
  dtype                auto (default), float32, bfloat16, float16
  attn_implementation  sdpa (default) or eager: the implementations tokencompress runs under
  trust_remote_code, revision   passed to from_pretrained
  every other key      a parameter of the compressor: `layer=2,keep=0.5` builds tc.build("fastv", layer=2, keep=0.5)

Values: lmms-eval already turns `true`/`false` into bools, digits into ints and decimals into floats (so
`keep=64` is a token count and `keep=0.5` or `keep=1.0` a ratio). On top of that, `none` is None, `a|b|c` is a
list (`after_layers=1|3`), and a value in brackets is JSON (`experts=[[1,1],[1,2],[2,2]]`; lmms-eval does not
split at commas inside brackets, but quote the whole --model_args for the shell).
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tokencompress.lmms_eval_model needs lmms-eval: pip install 'tokencompress[lmms]' (or lmms_eval>=0.6)"
    ) from error

from . import api
from .compressors import build, registry

MODEL_NAME = "tokencompress"
NONE = "none"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "eager")
DEFAULT_MAX_NEW_TOKENS = 1024
# model_args this class takes itself; every other key is a compressor parameter
OWN_ARGS = (
    "pretrained",
    "compressor",
    "compressor_dir",
    "device",
    "batch_size",
    "max_batch_size",
    "dtype",
    "attn_implementation",
    "trust_remote_code",
    "revision",
)


def lmms_eval_manifest():
    """The `lmms_eval.models` entry point: register `TokenCompressLMM` as the simple model "tokencompress"."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.TokenCompressLMM")


def parse_value(value: Any) -> Any:
    """A compressor parameter from model_args: `none` -> None, `a|b` -> a list, `[...]`/`{...}` -> JSON; ints,
    floats and bools arrive already converted by lmms-eval (strings that look like them are converted here)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() == NONE:
        return None
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"cannot parse {value!r} as JSON: {error}") from error
    if "|" in text:
        return [parse_value(item) for item in text.split("|")]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_compressor(name: Any, params: dict[str, Any]):
    """The compressor that model_args ask for, or None for `compressor=none`; raises a ValueError naming what
    is allowed. Runs before any weights are loaded."""
    names = sorted(registry())
    if name is None or (isinstance(name, str) and name.lower() == NONE):
        if params:
            raise ValueError(
                f"compressor=none takes no parameters, got {sorted(params)}; the model_args of "
                f"{MODEL_NAME} are {list(OWN_ARGS)}, and any other key is a parameter of the compressor"
            )
        return None
    if not isinstance(name, str) or name not in registry():
        raise ValueError(f"unknown compressor {name!r}; registered: {names}, or {NONE!r} for no compression")
    cls = registry()[name]
    allowed = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"compressor {name!r} has no parameter(s) {unknown}; its parameters are {allowed} (model_args of "
            f"{MODEL_NAME} itself: {list(OWN_ARGS)})"
        )
    try:
        return build(name, **{key: parse_value(value) for key, value in params.items()})
    except (TypeError, ValueError) as error:
        raise ValueError(f"bad parameters for compressor {name!r} ({params}): {error}") from error


class TokenCompressLMM(lmms):
    """A Hugging Face image-text-to-text model with tokencompress applied, as an lmms-eval simple model.

    generate_until: batched greedy (or sampled, with temperature > 0) generation with left padding, the
    processor's chat template (one user turn: the request's images, then its text), stopped at `until` and
    `max_new_tokens`. loglikelihood: the context is prefilled (and compressed) exactly as for generation, then
    the continuation is scored on that cache, so the compressor decides from the prompt as it does when
    generating, not from the answer being scored; one request at a time. Like lmms-eval's own llava, llava_hf
    and llava_onevision models, it returns (mean negative log-likelihood per continuation token, is greedy):
    lmms-eval's multiple-choice scoring takes the argmin of the first value.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        compressor: str | None = NONE,
        compressor_dir: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        revision: str = "main",
        **compressor_params: Any,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not pretrained:
            raise ValueError(f"{MODEL_NAME} needs pretrained=<Hugging Face model id or local directory>")
        if compressor_dir is not None:
            if (compressor is not None and str(compressor).lower() != NONE) or compressor_params:
                raise ValueError("pass either compressor_dir or compressor (with its parameters), not both")
            if not os.path.isfile(os.path.join(compressor_dir, api.CONFIG_NAME)):
                raise ValueError(
                    f"compressor_dir={compressor_dir!r} has no {api.CONFIG_NAME} (tc.save_pretrained)"
                )
            pipeline = None
        else:
            pipeline = build_compressor(compressor, compressor_params)
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; allowed: auto, {', '.join(DTYPES)}")
        if attn_implementation not in ATTENTION:
            raise ValueError(
                f"attn_implementation={attn_implementation!r}; tokencompress runs under {ATTENTION}"
            )

        if device is None:  # under `accelerate launch`, one GPU per process; lmms-eval shards the requests
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.pretrained = pretrained
        model = AutoModelForImageTextToText.from_pretrained(
            pretrained,
            revision=revision,
            dtype=DTYPES.get(dtype, "auto"),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        self._model = model.to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(
            pretrained, revision=revision, trust_remote_code=trust_remote_code
        )
        self._tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        if compressor_dir is not None:
            api.from_pretrained(self._model, compressor_dir)
        elif pipeline is not None:
            api.compress(self._model, pipeline)
        self.compressed = compressor_dir is not None or pipeline is not None

    # --- what lmms-eval and users read -----------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int | None:
        return self._tokenizer.eos_token_id

    # --- prompts ----------------------------------------------------------------------------------------
    def _visuals(self, args: tuple) -> list[Any]:
        """The request's images: doc_to_visual(doc), flattened; image paths are opened; videos are refused."""
        doc_to_visual, doc_id, task, split = args[-4:]
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        return [self._image(item) for item in _flatten(visuals) if item is not None]

    @staticmethod
    def _image(item: Any) -> Any:
        from PIL import Image

        if isinstance(item, Image.Image):
            return item.convert("RGB")
        if isinstance(item, str) and item.lower().endswith(
            (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
        ):
            return Image.open(item).convert("RGB")
        raise NotImplementedError(
            f"{MODEL_NAME} evaluates image tasks; got a {type(item).__name__} visual ({str(item)[:80]!r})"
        )

    def _prompt(self, context: str, images: int) -> str:
        """One user turn with the images then the text, through the processor's chat template if it has one."""
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        if image_token in context:  # the task placed its images itself
            content: list[dict[str, str]] = [{"type": "text", "text": context}]
            plain = context
        else:
            content = [{"type": "image"}] * images + [{"type": "text", "text": context}]
            plain = (" ".join([image_token] * images) + "\n" + context) if images else context
        if getattr(self.processor, "chat_template", None) or getattr(self._tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return plain

    def _inputs(self, texts: list[str], images: list[Any]) -> Any:
        """Tokenize (special tokens added unless the chat template already starts with BOS, as transformers'
        own processor.apply_chat_template does) and process the images, on the model's device and dtype."""
        bos = self._tokenizer.bos_token
        special = not (bos and texts[0].startswith(bos))
        inputs = self.processor(
            text=texts, images=images or None, return_tensors="pt", padding=True, add_special_tokens=special
        )
        return inputs.to(self._device, dtype=self._model.dtype)

    # --- requests ---------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="tokencompress responding")
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))  # similar lengths together, less padding
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                texts = self._generate([requests[i].args for i in batch])
                for i, text in zip(batch, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial(
                        "generate_until", (requests[i].args[0], requests[i].args[1]), text
                    )
                progress.update(len(batch))
        progress.close()
        return results  # type: ignore[return-value]

    def _generate(self, batch: list[tuple]) -> list[str]:
        gen_kwargs = dict(batch[0][1] or {})
        until = gen_kwargs.pop("until", None)
        if until is None:
            until = [self._tokenizer.decode([self.eot_token_id])] if self.eot_token_id is not None else []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")
        until = [stop for stop in until if stop]
        max_new_tokens = int(gen_kwargs.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        top_p = gen_kwargs.pop("top_p", None)
        num_beams = int(gen_kwargs.pop("num_beams", 1) or 1)
        do_sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
        options: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "num_beams": num_beams,
        }
        if do_sample:
            options["temperature"] = temperature if temperature > 0 else 1.0
            if top_p is not None:
                options["top_p"] = float(top_p)
        stop = self._stop_criteria(tuple(until))
        if stop is not None:
            options["stopping_criteria"] = stop

        texts, images = [], []
        for context, _, *rest in batch:
            visuals = self._visuals(tuple(rest))
            texts.append(self._prompt(context, len(visuals)))
            images.extend(visuals)
        inputs = self._inputs(texts, images)
        pad = self._tokenizer.pad_token_id
        with torch.inference_mode():
            output = self._model.generate(**inputs, pad_token_id=pad, **options)
        new = output[:, inputs["input_ids"].shape[1] :]
        answers = []
        for text in self._tokenizer.batch_decode(new, skip_special_tokens=True):
            for stop in until:
                text = text.split(stop)[0]
            answers.append(text.strip())
        return answers

    def _stop_criteria(self, until: tuple[str, ...]) -> Any:
        """Stop a sample's generation once it produced an `until` string (answers are cut there in any case);
        None where there is nothing to stop at or the tokenizer's vocabulary does not allow it."""
        from transformers import StoppingCriteriaList, StopStringCriteria

        cache = self.__dict__.setdefault("_stops", {})
        if until not in cache:
            try:
                cache[until] = (
                    StoppingCriteriaList([StopStringCriteria(self._tokenizer, list(until))])
                    if until
                    else None
                )
            except Exception as error:  # e.g. a vocabulary StopStringCriteria cannot map to strings
                warnings.warn(f"generating without early stop at {list(until)}: {error}", stacklevel=2)
                cache[until] = None
        return cache[until]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        from tqdm import tqdm

        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="tokencompress scoring"):
            results.append(self._loglikelihood(request.args))
            self.cache_hook.add_partial("loglikelihood", request.args[:2], results[-1])
        return results

    def _loglikelihood(self, args: tuple) -> tuple[float, bool]:
        context, continuation = args[0], args[1]
        images: list[Any] = []
        if len(args) >= 6:
            doc_to_visual, doc_id, task, split = args[2:6]
            if callable(continuation):  # output_type loglikelihood passes doc_to_target
                continuation = continuation(self.task_dict[task][split][doc_id])
            images = self._visuals((doc_to_visual, doc_id, task, split))
        continuation = str(continuation)
        prompt = self._prompt(context, len(images)) if (context or images) else ""
        ids = self._inputs([prompt + continuation], images)["input_ids"]
        if prompt:
            prefix = self._inputs([prompt], images)
            split_at = prefix["input_ids"].shape[1]
        else:  # no context: condition on BOS (the tokenizer's, or one put in front)
            start = self._tokenizer.bos_token_id
            if start is None or int(ids[0, 0]) != start:
                start = start if start is not None else self.eot_token_id
                ids = torch.cat([torch.tensor([[start]], device=ids.device), ids], 1)
            prefix = {"input_ids": ids[:, :1], "attention_mask": torch.ones_like(ids[:, :1])}
            split_at = 1
        target = ids[:, split_at:]
        if target.shape[1] == 0:
            raise ValueError(f"the continuation {continuation!r} adds no tokens to the context")
        with torch.inference_mode():
            first = self._model(**prefix, use_cache=True)
            logits = [first.logits[:, -1:]]
            if target.shape[1] > 1:
                mask = torch.ones(1, ids.shape[1] - 1, dtype=torch.long, device=ids.device)
                rest = self._model(
                    input_ids=target[:, :-1],
                    attention_mask=mask,
                    past_key_values=first.past_key_values,
                    use_cache=True,
                )
                logits.append(rest.logits)
        logprobs = torch.log_softmax(torch.cat(logits, 1).float(), -1)
        loss = -logprobs.gather(2, target.unsqueeze(-1)).mean()
        greedy = bool((logprobs.argmax(-1) == target).all())
        return float(loss), greedy

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} does not run multi-round generation tasks")


def _flatten(visuals: Any) -> list[Any]:
    if isinstance(visuals, (list, tuple)):
        return [item for entry in visuals for item in _flatten(entry)]
    if (
        isinstance(visuals, Iterable)
        and not isinstance(visuals, (str, bytes, dict))
        and not _is_image(visuals)
    ):
        return [item for entry in visuals for item in _flatten(entry)]
    return [visuals]


def _is_image(item: Any) -> bool:
    from PIL import Image

    return isinstance(item, Image.Image)
