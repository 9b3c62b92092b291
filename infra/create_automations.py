"""Create or update the automations of infra/automations.yaml on the Prefect server in PREFECT_API_URL.

    python infra/create_automations.py [--file infra/automations.yaml] [--notify slack-webhook/adaptflow-alerts]

An automation that already exists (by name) is updated, so running this twice changes nothing.
"""

import argparse
from pathlib import Path
from uuid import UUID

import yaml
from prefect.automations import Automation
from prefect.client.orchestration import get_client

HERE = Path(__file__).parent


def load_automations(path: Path, notify_block_id: UUID) -> list[Automation]:
    """The file's automations, validated, with every notification sent to `notify_block_id`."""
    spec = yaml.safe_load(path.read_text())
    automations = []
    for item in spec["automations"]:
        actions = [
            {"block_document_id": str(notify_block_id), **a} if a["type"] == "send-notification" else a
            for a in item["actions"]
        ]
        automations.append(Automation.model_validate({**item, "actions": actions}))
    return automations


def notification_block_id(ref: str) -> UUID:
    """The id of the notification block `ref` ("slack-webhook/adaptflow-alerts"); its secrets stay on the server."""
    block_type, _, name = ref.partition("/")
    with get_client(sync_client=True) as client:
        return client.read_block_document_by_name(name, block_type, include_secrets=False).id


def apply(automation: Automation) -> str:
    """Create `automation`, or update the one of the same name; returns what was done."""
    try:
        existing = Automation.read(name=automation.name)
    except ValueError:
        automation.create()
        return "created"
    automation.id = existing.id
    automation.update()
    return "updated"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=HERE / "automations.yaml")
    parser.add_argument("--notify", help="notification block as TYPE/NAME; default: the file's `notify`")
    args = parser.parse_args(argv)

    notify = args.notify or yaml.safe_load(args.file.read_text())["notify"]
    for automation in load_automations(args.file, notification_block_id(notify)):
        print(f"{apply(automation)} {automation.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
