"""An lm-evaluation-harness model class over any ds-bench backend, registered as "ds".

    import ds_bench.lm_eval_model  # registers "ds"
    lm_eval.simple_evaluate(model="ds", model_args="path=out/ds-small,backend=torch", tasks=[...])

or `ds-bench lm-eval --model DIR --tasks wikitext ...`. The three request types are answered from
the backend's logits and greedy generation, tokenized with the model directory's tokenizer.json:

  loglikelihood          log P(continuation | context), and whether it is the greedy continuation
  loglikelihood_rolling  log P(document) over disjoint windows of at most `max_length` tokens, the
                         first conditioned on the EOS token (the harness's rolling-window scheme)
  generate_until         greedy continuation, cut at the first `until` string or max_gen_toks
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lm_eval import utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ds_bench.backends import Backend, make_backend
from ds_bench.errors import BenchError

EOS = "<|endoftext|>"


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@register_model("ds")
class DsLM(LM):
    def __init__(
        self,
        path: str | None = None,
        backend: str | Backend = "torch",
        device: str = "cpu",
        dtype: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 64,
        threads: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if path is None:
            raise BenchError("model_args: path: required (a ds model directory)")
        from ds_models import load_tokenizer

        model_dir = Path(path)
        if isinstance(backend, Backend):
            self.backend = backend
        else:
            self.backend = make_backend(backend, device, dtype, threads)
            self.backend.load(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        if self.tokenizer is None:
            raise BenchError(f"model_args: path: {model_dir}: has no tokenizer.json (lm-eval works on text)")
        eos = self.tokenizer.token_to_id(EOS)
        if eos is None:
            raise BenchError(f"{model_dir / 'tokenizer.json'}: no {EOS} token to start documents with")
        self.eot_token_id = eos
        self.max_length = int(max_length or _max_seq_len(model_dir) or 2048)
        self.max_gen_toks = int(max_gen_toks)

    # -- helpers --

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _logprobs(self, ids: list[int]) -> np.ndarray:
        """log P(next token) for every position: (T, vocab)."""
        return _log_softmax(self.backend.logits(ids))

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = (context + continuation)[-(self.max_length + 1) :]
        n = len(continuation)
        logp = self._logprobs(ids[:-1])[-n:]  # predictions for the continuation tokens
        target = np.asarray(ids[-n:])
        total = float(logp[np.arange(n), target].sum())
        greedy = bool((logp.argmax(-1) == target).all())
        return total, greedy

    # -- the harness API --

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx = self.tok_encode(context) if context else [self.eot_token_id]
            cont = self.tok_encode(continuation)
            out.append(self._score(ctx, cont) if cont else (0.0, True))
            self.cache_hook.add_partial("loglikelihood", req.args, out[-1])
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.eot_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            total = 0.0
            for context, continuation in map(utils.make_disjoint_window, windows):
                total += self._score(list(context), list(continuation))[0]
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or [EOS]
            until = [until] if isinstance(until, str) else list(until)
            n = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = (self.tok_encode(context) or [self.eot_token_id])[-(self.max_length - n) :]
            new: list[int] = []
            self.backend.generate([ids], n, lambda i, tok, t, new=new: new.append(tok[0]))
            text = self.tokenizer.decode(new)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out


def _max_seq_len(model_dir: Path) -> int | None:
    cfg = model_dir / "config.yaml"
    if not cfg.exists():
        return None
    from ds_models import ModelConfig

    return ModelConfig.from_yaml(cfg).max_seq_len
