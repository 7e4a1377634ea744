"""mmpretrain: distributed image–text pretraining (CLIP/SigLIP) on DeepSpeed."""
__version__ = "0.1.0"
