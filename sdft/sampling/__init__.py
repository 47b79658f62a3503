"""On-policy sampling and greedy decoding behind one interface (`Sampler`): the native KV-cache sampler."""
from sdft.sampling.base import Rollout, Sampler, SamplingParams, stop_token_ids
from sdft.sampling.native import NativeSampler

__all__ = ["Rollout", "Sampler", "SamplingParams", "NativeSampler", "stop_token_ids"]
