"""Spectral analysis of weight updates: spectra, rank@p, factor SVD, random baseline, intruders.

    from lora_jax import analysis
    result = analysis.analyze(base_params, ft_params, modules="q_proj,down_proj")
    analysis.save_analysis(result, "out/")
"""

from lora_jax.analysis.analyze import Analysis, analyze, parse_modules
from lora_jax.analysis.baseline import (attach_random_baseline, marchenko_pastur_rank_fraction,
                                        random_baseline)
from lora_jax.analysis.intruders import count_intruders, intruder_dimensions, max_cosine_stacked
from lora_jax.analysis.io import load_analysis, save_analysis
from lora_jax.analysis.sources import (HFSource, ParamsSource, PeftSource, WeightSource,
                                       open_source)
from lora_jax.analysis.spectra import (effective_rank, explained_variance, factor_svd,
                                       normalized_spectrum, pair_spectra, rank_at_variance,
                                       relative_norm, singular_values, singular_values_stacked)

__all__ = [
    "Analysis", "analyze", "parse_modules", "attach_random_baseline",
    "marchenko_pastur_rank_fraction", "random_baseline",
    "count_intruders", "intruder_dimensions", "max_cosine_stacked", "load_analysis",
    "save_analysis", "HFSource", "ParamsSource", "PeftSource", "WeightSource", "open_source",
    "effective_rank", "explained_variance", "factor_svd", "normalized_spectrum", "pair_spectra",
    "rank_at_variance", "relative_norm", "singular_values", "singular_values_stacked",
]
