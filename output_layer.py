"""The model's output layer, for callers that want logits of chosen tokens only: its body
(hidden states) and head, under PEFT and DeepSpeed wrappers too, and the logits of some rows
of the output matrix as the model's own forward computes them. Generation (grounded decoding
compares allowed tokens only) and the training loss (loss_vocabulary=batch) both use it."""
import torch


def body_and_head(model):
    """The model's body and output layer (the LoRA layers are inside them), and whether the
    output weights can be used row by row: a plain nn.Linear. Anything else (a quantised or
    wrapped head) can only run as a module on the full vocabulary."""
    model = getattr(model, "module", model)  # a DeepSpeed engine holds the model as .module
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    return lm.model, head, type(head) is torch.nn.Linear


def head_rows(head, token_ids):
    """The output layer's (weight, bias) rows for `token_ids`."""
    return head.weight[token_ids], None if head.bias is None else head.bias[token_ids]


def output_logits(model, head, hidden, rows=None):
    """Output logits of `hidden` (..., hidden) as the model's own forward computes them (Gemma
    2's final soft-capping included): for every token, or for `rows` = head_rows(...) only."""
    logits = head(hidden) if rows is None else torch.nn.functional.linear(hidden, *rows)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits
