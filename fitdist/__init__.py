"""fitdist: FitNets hints (Romero et al. 2014) and knowledge distillation (Hinton et al. 2015)."""

__version__ = "0.1.0"
