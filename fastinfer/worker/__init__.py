"""Device-side work of a step: input building, the model forward, sampling."""
