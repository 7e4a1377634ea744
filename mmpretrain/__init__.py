"""mmpretrain: distributed image–text pretraining (CLIP/SigLIP) on DeepSpeed."""
import logging as _logging

__version__ = "0.1.0"


class _LibraryNoise(_logging.Filter):
    """Drops import-time warnings that concern the libraries' authors, not our users.

    torchao (our `fp8` extra; transformers and DeepSpeed import it whenever it is installed)
    warns once per compiled extension that does not load against this torch build (a CPU
    build, another release); `engine.float8` uses none of them, it calls torch's scaled
    matmul. torchao also registers Enums with torch's pytree, which torch now deprecates."""

    def filter(self, record: _logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith(("Failed to load", "Skipping import of cpp extensions"))
                    or "register_constant() on Enum subclasses is deprecated" in msg)


_logging.getLogger("torchao").addFilter(_LibraryNoise())
_logging.getLogger("torch.utils._pytree").addFilter(_LibraryNoise())
