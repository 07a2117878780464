"""An OLMo 2 step (transformers' Olmo2ForCausalLM, 12 layers at width 64, 16 tokens, vocabulary 256: the
llama_step's sizes) in llama_step's place: eager against patched (loss="fused")."""

import __main__

import torch
import transformers

import gpukernels as gk


def olmo2_step():
    cfg = transformers.Olmo2Config(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=12,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    ids = torch.randint(0, 256, (1, 16))

    def build():
        torch.manual_seed(0)
        return transformers.Olmo2ForCausalLM(cfg)

    def loss_of(model):
        return lambda ids: model(input_ids=ids, labels=ids).loss

    def patched_loss_of(model):
        gk.patch(model, loss="fused")
        return loss_of(model)

    return __main__._steps_of(build, loss_of, patched_loss_of, (ids,))


__main__.CASES["llama_step"] = olmo2_step
