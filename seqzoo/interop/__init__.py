"""Loading weights from other libraries (mamba-ssm, ...) into seqzoo mixers."""
