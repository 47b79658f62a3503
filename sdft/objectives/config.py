"""The `objective` config section: the settings every objective shares, then one sub-section per kind."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from sdft.objectives.full_vocab import FullVocabSettings
from sdft.objectives.topk import TopKSettings
from sdft.schema import Section, setting, subsection

__all__ = ["ObjectiveConfig"]


@dataclass(frozen=True)
class ObjectiveConfig(Section):
    targets: Literal["full", "topk", "sampled"] = setting(
        "full", doc="full: full-vocabulary divergence (paper); topk: the teacher's top-K (cookbook); "
                    "sampled: the sampled token only (top-K = 0 fallback)")
    reduction: Literal["seq_mean", "token_mean", "sum"] = setting(
        "seq_mean", doc="over the optimizer batch: seq_mean (token mean per sequence, then mean over sequences; "
                        "official), token_mean, or sum (cookbook)")
    skip_first_n_tokens: int = setting(3, ge=0, doc="the first n completion tokens get no loss")
    temperature: float = setting(1.0, gt=0, doc="p = softmax(z / T) for teacher and student")
    is_clip: Optional[float] = setting(2.0, gt=0, doc="cap of the truncated importance weight; null disables it")
    impl: Literal["auto", "reference", "chunked", "triton"] = setting("auto", doc="the sdft.losses path")
    chunk_size: Optional[int] = setting(None, ge=1, doc="token rows per chunk of the fused losses (null: automatic)")
    full: FullVocabSettings = subsection(FullVocabSettings, doc="objective.targets=full")
    topk: TopKSettings = subsection(TopKSettings, doc="objective.targets=topk")
