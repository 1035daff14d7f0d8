"""Data for the GLUE runner and the offline demo.

Importing this package imports neither ``datasets`` nor ``transformers``; the functions that need
them import them when called.
"""
from ._common import TensorBatches
from .glue import GLUE_TASKS, GlueCollator, GlueTask, collate_glue, glue_collator, glue_task, load_glue, tokenize_glue
from .vader import (
    MINILM_FILES,
    TextExamples,
    VaderEntry,
    load_vader,
    minilm_path,
    read_vader_lexicon,
    tokenize_texts,
    vader_lexicon_path,
)

__all__ = [
    "GLUE_TASKS",
    "GlueCollator",
    "GlueTask",
    "MINILM_FILES",
    "TensorBatches",
    "TextExamples",
    "VaderEntry",
    "collate_glue",
    "glue_collator",
    "glue_task",
    "load_glue",
    "load_vader",
    "minilm_path",
    "read_vader_lexicon",
    "tokenize_glue",
    "tokenize_texts",
    "vader_lexicon_path",
]
