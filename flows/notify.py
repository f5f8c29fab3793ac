"""Failure notifications through a Prefect notification block (Slack, webhook, e-mail, ...)."""

from __future__ import annotations

from prefect.blocks.core import Block
from prefect.blocks.notifications import NotificationBlock
from prefect.client.orchestration import get_client


class NotifyBlockError(ValueError):
    """eval.notify_block names no usable notification block."""


def load_notification_block(name: str) -> NotificationBlock:
    """`<block-type-slug>/<name>` (e.g. custom-webhook/ml-alerts), or a block name alone when only one
    block document carries that name."""
    if "/" not in name:
        with get_client(sync_client=True) as client:
            found = [doc for doc in client.read_block_documents(include_secrets=False)
                     if doc.name == name and doc.block_type is not None]
        if len(found) != 1:
            raise NotifyBlockError(f"eval.notify_block {name!r}: {len(found)} blocks carry that name; "
                                   f"write it as <block-type>/<name> (see `prefect block ls`)")
        name = f"{found[0].block_type.slug}/{name}"
    try:
        block = Block.load(name)
    except ValueError as err:
        raise NotifyBlockError(f"eval.notify_block {name!r}: {' '.join(str(err).split())}; "
                               f"create it first (see `prefect block ls`)") from None
    if not isinstance(block, NotificationBlock):
        raise NotifyBlockError(f"eval.notify_block {name!r}: a {type(block).__name__}, not a notification block")
    return block
