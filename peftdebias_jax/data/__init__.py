"""Data: CDA, masking, records, tokenization and bucketed batches."""

from peftdebias_jax.data import cda, mlm, pipeline, records

__all__ = ["cda", "mlm", "pipeline", "records"]
