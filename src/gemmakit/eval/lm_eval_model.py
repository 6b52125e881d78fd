"""gemmakit as an lm-evaluation-harness model: every harness task runs on any model gemmakit loads.

    import gemmakit.eval.lm_eval_model  # registers "gemmakit"
    lm_eval.simple_evaluate(model="gemmakit", model_args="model=path/to/model,quantize=int4", tasks=[...])

or from the shell: `python -m gemmakit.eval.lm_eval_model --model gemmakit --model_args ... --tasks ...` (the
harness's own command line, with this model registered first). Requests go to eval/backends.LocalBackend, the
scorer gemmakit's own tasks use, so a harness task and `gemmakit eval` give the same log-likelihoods.
`generate_until` honours the request's `until`, `max_gen_toks`, `temperature` and `do_sample`.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from gemmakit.eval.backends import GenParams, LocalBackend


@register_model("gemmakit")
class GemmakitLM(LM):
    def __init__(self, model: str | None = None, quantize: str = "none", adapter: str | None = None,
                 dtype: str = "auto", device: str = "cpu", batch_size: int | str = 8, max_length: int | None = None,
                 llm: Any = None, **_: Any):
        super().__init__()
        if llm is None:
            from gemmakit.api import load

            llm = load(model, dtype, device, context=max_length, quantize=quantize, adapter=adapter)
        self.backend = LocalBackend(llm, int(batch_size) if str(batch_size).isdigit() else 8)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.backend.loglikelihood([r.args[:2] for r in requests])

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        return [ll for ll, _ in self.backend.loglikelihood_rolling([r.args[0] for r in requests])]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.get("until") or []
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            params = GenParams(int(kwargs.get("max_gen_toks", 256)), temperature,
                               tuple([until] if isinstance(until, str) else until), 0)
            out.append(self.backend.generate([context], params)[0])
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
