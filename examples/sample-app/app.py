"""A deliberately vulnerable little service: the target of examples/vulnerability-fix.yaml."""

import hashlib
import subprocess


def run_report(name):
    subprocess.run(f"report --name {name}", shell=True, check=False)


def fingerprint(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def evaluate(expression: str):
    return eval(expression)
