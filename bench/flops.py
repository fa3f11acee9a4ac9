"""How many model FLOPs the benchmarked work costs, for MFU: a model's matmul weights (read from its
config on the meta device, no weights loaded) and the FLOPs per token of a forward pass or of a LoRA
training step."""
import torch

from model_utils import meta_model


def model_shape(model_dir):
    """(matmul weights N, layers L, hidden d), from the config on the meta device (no weights)."""
    model = meta_model(model_dir)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return n, model.config.num_hidden_layers, model.config.hidden_size


def body_shape(model_dir):
    """(matmul weights of the body N, layers, hidden, vocabulary): the output layer apart, since
    training computes it only where a target is trained and grounded generation only for the
    tokens a row can allow."""
    model = meta_model(model_dir)
    head = model.get_output_embeddings()
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return n, model.config.num_hidden_layers, model.config.hidden_size, head.weight.shape[0]


def flops_per_token(shape, context, training):
    """Model FLOPs per real token. Forward: 2N for the matmuls plus 4*L*d*T for attention over a
    T-token context. LoRA training adds the backward pass through the frozen weights (2N, input
    gradients only; LoRA's own weights are negligible) and twice the attention forward."""
    n, layers, hidden = shape
    attention = 4 * layers * hidden * context
    return (4 * n + 3 * attention) if training else (2 * n + attention)


def run_tokens(batch, share_prefix):
    """Tokens a training step runs through the model: the real ones, the shared prefix once."""
    from loss import loss_free_prefix_length

    real = int(batch["attention_mask"].sum())
    return real - (len(batch["input_ids"]) - 1) * loss_free_prefix_length(batch) if share_prefix else real
