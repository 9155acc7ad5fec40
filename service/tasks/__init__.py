"""The tasks the service serves. Adding one = a module here plus one entry in TASKS."""

from service.repository import ManifestChecks
from service.tasks import classify, detect, embed, generate, zero_shot
from service.tasks.base import Task

TASKS: dict[str, Task] = {
    classify.NAME: classify.TASK,
    detect.NAME: detect.TASK,
    generate.NAME: generate.TASK,
    embed.NAME: embed.TASK,
    zero_shot.NAME: zero_shot.TASK,
}


def manifest_checks(tasks: dict[str, Task]) -> ManifestChecks:
    return {name: task.check_manifest for name, task in tasks.items()}
