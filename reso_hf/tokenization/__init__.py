"""ResoTokenizer, its prime map and the guanaco chat template (SPEC §4).

Defined once, in the self-contained modeling wing (it is copied into checkpoints); re-exported here.
"""

from ..modeling.tokenization_reso_llm import (
    GUANACO_CHAT_TEMPLATE,
    ResoTokenizer,
    create_default_tokenizer,
    train_tokenizer,
)

__all__ = ["ResoTokenizer", "create_default_tokenizer", "train_tokenizer", "GUANACO_CHAT_TEMPLATE"]
