"""``llave-ds mine``: hard negatives mined with a model, filtered for false negatives."""
