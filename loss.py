"""The training loss of a batch, as both trainers compute it: answer tokens only, the shared
prompt prefix run once per batch, logits only where a target is trained."""
import torch

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
    if cfg.share_prefix and not cfg.gradient_checkpointing:
        return shared_prefix_loss(model, batch, num_items_in_batch)
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    return model(**batch, **kwargs).loss


def shared_prefix_loss(model, batch, num_items_in_batch=None):
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
        return answer_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], num_items_in_batch)
    ids = batch["input_ids"]
    # Its logits carry no loss: an all-False mask keeps none (one position would cost a full
    # vocabulary row, 262,144 logits on Gemma 3, forward and backward).
    none = torch.zeros((1, n), dtype=torch.bool, device=ids.device)
    cache = model(input_ids=ids[:1, :n], use_cache=True, logits_to_keep=none).cache
    cache.batch_repeat_interleave(ids.shape[0])
    return answer_loss(model, ids[:, n:], batch["attention_mask"], batch["labels"][:, n:], num_items_in_batch,
                       cache=cache, use_cache=True)


def answer_loss(model, input_ids, attention_mask, labels, num_items_in_batch=None, **forward):
    """Causal-LM cross-entropy (as transformers' ForCausalLMLoss) with logits computed only at
    positions whose next token is a target: the answer, ~10 of a row's ~60 own tokens on MSRA.

    The output layer is vocabulary x hidden: on the demo's small model it is over half of the
    per-token work, and on 7B the full logits are the largest activation of a step.
    """
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # position p predicts token p + 1
    keep = targets != -100
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **forward).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()  # (trained positions, vocabulary), row-major as keep
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits, targets[keep])
    loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
