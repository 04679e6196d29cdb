"""Where the weights of the model being sliced live while it is sliced."""

from __future__ import annotations


class WeightStore:
    """Where the weights of the model being sliced live. This one: already in memory (the model as
    given); a layer is moved to the compute device while it is worked on and back to the CPU after.
    toolchain/compress/streaming.py's subclass reads each layer from the checkpoint when opened and writes it
    out (or drops it) when closed, so only the layers in flight are ever resident."""

    def open_embedding(self, model, device) -> None:
        for module in (model.embed_tokens, model.embed_positions, model.embed_proj, model.rotary):
            if module is not None:
                module.to(device)

    def close_embedding(self, model, write: bool) -> None:
        for module in (model.embed_tokens, model.embed_positions, model.embed_proj):
            if module is not None:
                module.to("cpu")

    def open_layer(self, model, index: int, device) -> None:
        model.layers[index].to(device)

    def close_layer(self, model, index: int, write: bool) -> None:
        model.layers[index].to("cpu")

    def open_head(self, model, device, table: bool = True) -> None:
        """The head_proj (tied), and with `table` the untied LM head, on the compute device (a tied
        head is the token table, which the head's position never rotates)."""
        for module in (model.head_proj, model.lm_head if table and not model.config.tie_word_embeddings else None):
            if module is not None:
                module.to(device)

    def close_head(self, model, write: bool) -> None:
        model.to("cpu")

    def finish(self, model) -> None:
        model.to("cpu")
