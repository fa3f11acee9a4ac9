"""The training loss of a batch, as both trainers compute it: answer tokens only, the shared
prompt prefix run once per batch, logits only where a target is trained, over the whole
vocabulary or (loss_vocabulary=batch) over the tokens the batch holds."""
import torch

from config_utils import ConfigError
from output_layer import body_and_head, head_rows, output_logits

LOSS_VOCABULARIES = ("all", "batch")

MIN_LOSS_FREE_PREFIX = 16  # below this, a separate prefix pass costs more than it saves


def loss_free_prefix_length(batch):
    """Leading tokens every row of a right-padded batch shares and that carry no loss.

    Every MSRA example starts with BOS + template + instruction (~70% of its tokens). Positions
    whose prediction is trained (labels after the shift) must stay in the per-row part.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(dim=0).long().cumprod(0)
    n = int(same.sum())
    trained = (labels != -100).any(dim=0).nonzero()
    if len(trained):
        n = min(n, int(trained[0]) - 1)  # the token before the first target stays with its row
    return n if n >= MIN_LOSS_FREE_PREFIX else 0


def batch_loss(model, batch, cfg, num_items_in_batch=None):
    """The training loss of one batch, as both trainers compute it."""
    vocabulary = batch_vocabulary(batch) if cfg.loss_vocabulary == "batch" else None
    if cfg.share_prefix and not cfg.gradient_checkpointing:
        return shared_prefix_loss(model, batch, num_items_in_batch, vocabulary)
    if vocabulary is not None:
        return answer_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], num_items_in_batch,
                           vocabulary)
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    return model(**batch, **kwargs).loss


def batch_vocabulary(batch):
    """The token ids a batch holds (prompts and answers, padding left out), ascending.

    Every target is among them, so a softmax over them is a proper loss; its negatives are the
    other tokens of the batch's sentences and prompts. That is what grounded decoding compares
    at inference (the next characters of the sentence, the marks, the type names, EOS), and it
    spares the output layer's full rows: on Gemma 3 270M, 262,144 logits a trained position,
    about 40% of an inline-format example's training FLOPs, against a thousand or so here.
    """
    return torch.unique(batch["input_ids"][batch["attention_mask"].bool()])


def shared_prefix_loss(model, batch, num_items_in_batch=None, vocabulary=None):
    """The batch's loss with its shared prefix run once instead of once per row.

    The prefix's keys and values are computed for one row and repeated for the batch (the
    repeat is differentiable, so their gradients add up as in a full batch); the rows then run
    only their own tokens on top, and the output layer runs only where a target is trained
    (answer_loss). Without LoRA dropout the loss and gradients equal the plain forward's up to
    float rounding (tests/test_training.py checks both). With dropout the rows share one
    dropout mask on the prefix: the expected gradient is unchanged, its noise is correlated
    across the rows of a batch.
    """
    n = loss_free_prefix_length(batch)
    if n == 0:
        return answer_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], num_items_in_batch,
                           vocabulary)
    ids = batch["input_ids"]
    # Its logits carry no loss: an all-False mask keeps none (one position would cost a full
    # vocabulary row, 262,144 logits on Gemma 3, forward and backward).
    none = torch.zeros((1, n), dtype=torch.bool, device=ids.device)
    cache = model(input_ids=ids[:1, :n], use_cache=True, logits_to_keep=none).cache
    cache.batch_repeat_interleave(ids.shape[0])
    return answer_loss(model, ids[:, n:], batch["attention_mask"], batch["labels"][:, n:], num_items_in_batch,
                       vocabulary, cache=cache, use_cache=True)


def answer_loss(model, input_ids, attention_mask, labels, num_items_in_batch=None, vocabulary=None, **forward):
    """Causal-LM cross-entropy (as transformers' ForCausalLMLoss) with logits computed only at
    positions whose next token is a target: the answer, ~10 of a row's ~60 own tokens on MSRA.
    With `vocabulary` (ascending token ids holding every target) the softmax runs over those
    tokens only: the body's hidden states times those rows of the output matrix.

    The output layer is vocabulary x hidden: on the demo's small model it is over half of the
    per-token work, and on 7B the full logits are the largest activation of a step.
    """
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # position p predicts token p + 1
    keep = targets != -100
    if vocabulary is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **forward).logits
        logits = logits.reshape(-1, logits.shape[-1]).float()  # (trained positions, vocabulary), row-major as keep
    else:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # its forward prepares the gradient sync
            raise ConfigError("config key 'loss_vocabulary': batch runs in one process or under the deepspeed launcher, "
                              "not under torchrun's DistributedDataParallel (use loss_vocabulary=all)")
        body, head, by_rows = body_and_head(model)
        if not by_rows:
            raise ConfigError(f"config key 'loss_vocabulary': batch needs a plain linear output layer; this model's is "
                              f"{type(head).__name__} (use loss_vocabulary=all)")
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, **forward).last_hidden_state[keep]
        logits = output_logits(getattr(model, "module", model), head, hidden, head_rows(head, vocabulary)).float()
        targets = targets.clone()
        targets[keep] = torch.searchsorted(vocabulary, targets[keep])  # token id -> its column
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits, targets[keep])
    loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
