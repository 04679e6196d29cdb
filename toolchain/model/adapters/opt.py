"""OPT: pre-LayerNorm (centred into RMSNorm), ReLU MLP, learned positions with an offset of 2."""

from toolchain.core.errors import UnsupportedArchitectureError
from toolchain.model.adapters.base import Adapter, register


def _opt(cfg) -> dict:
    if not cfg.do_layer_norm_before or cfg.word_embed_proj_dim != cfg.hidden_size:
        raise UnsupportedArchitectureError(
            "OPT variants with post-LayerNorm or a projected embedding (e.g. opt-350m) are not supported; "
            "use opt-125m, opt-1.3b or larger")
    return dict(intermediate_size=cfg.ffn_dim, hidden_act=cfg.activation_function, norm_eps=1e-5,
                position_embedding="learned", learned_position_offset=2, rope_parameters=None)


register(Adapter(
    architectures=("OPTForCausalLM",),
    embed="model.decoder.embed_tokens",
    positions="model.decoder.embed_positions",
    layers="model.decoder.layers.{i}",
    final_norm="model.decoder.final_layer_norm",
    attn_norm="self_attn_layer_norm",
    mlp_norm="final_layer_norm",
    o="self_attn.out_proj",
    up="fc1", gate=None, down="fc2",
    layer_norm=True,
    config=_opt,
))
