"""AWS access for the ECS backend: boto3 clients whose errors become :class:`AWSRequestError`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from futures_hpc.errors import BackendUnavailableError, JobSubmissionError

from .constants import USER_AGENT

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
except ImportError:  # pragma: no cover - boto3 is the optional extra "ecs"
    boto3 = None

_THROTTLING_CODES = {"Throttling", "ThrottlingException", "ThrottledException",
                     "RequestLimitExceeded", "TooManyRequestsException",
                     "RequestThrottled", "RequestThrottledException", "SlowDown"}


class AWSRequestError(JobSubmissionError):
    """An AWS API call failed; the message names the operation, the AWS code and message.

    Attributes
    ----------
    service, operation : str
        E.g. ``"ecs"`` and ``"RunTask"``.
    code : str
        The AWS error code (``AccessDeniedException``, ``ThrottlingException``, ...).
    aws_message : str
        The message AWS gave.
    region : str

    """

    def __init__(self, service: str, operation: str, code: str, aws_message: str,
                 region: str, attempts: int | None = None):
        self.service = service
        self.operation = operation
        self.code = code
        self.aws_message = aws_message
        self.region = region
        self.attempts = attempts
        super().__init__(self._describe())

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.service, self.operation, self.code, self.aws_message,
                             self.region, self.attempts))

    def _describe(self) -> str:
        text = (f"AWS {self.service.upper()} {self.operation} failed in {self.region}: "
                f"{self.code}: {self.aws_message}")
        if self.is_access_denied:
            text += (f" (the AWS identity in use needs permission "
                     f"{self.service}:{self.operation})")
        elif self.is_throttling:
            text += (f" (still throttled after {self.attempts or 'all'} attempts of botocore's "
                     "standard retry mode; raise aws_max_attempts, scale more slowly, or ask "
                     "AWS for a higher rate limit)")
        return text

    @property
    def is_access_denied(self) -> bool:
        """Whether AWS refused the call for lack of permission."""
        return ("AccessDenied" in self.code or "Unauthorized" in self.code
                or "NotAuthorized" in self.code)

    @property
    def is_throttling(self) -> bool:
        """Whether AWS refused the call for its rate limit."""
        return self.code in _THROTTLING_CODES


def _require_boto3() -> None:
    if boto3 is None:
        raise BackendUnavailableError("the ecs backend needs boto3: "
                                      "pip install 'futures_hpc[ecs]'")


def _ecs_tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in tags.items()]


def _ec2_tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def _tags_as_dict(tags: Sequence[Mapping[str, str]] | None) -> dict[str, str]:
    return {tag.get("key", tag.get("Key")): tag.get("value", tag.get("Value", ""))
            for tag in tags or []}


class _AWSClients:
    """boto3 clients of one region; every call's errors become :class:`AWSRequestError`."""

    def __init__(self, region: str, endpoint_url: str | None, max_attempts: int,
                 session: Any = None):
        self.region = region
        self.max_attempts = max_attempts
        session = session or boto3.session.Session()
        config = Config(region_name=region, user_agent_extra=USER_AGENT,
                        retries={"mode": "standard", "total_max_attempts": max_attempts})
        self._clients = {name: session.client(name, region_name=region, config=config,
                                              endpoint_url=endpoint_url)
                         for name in ("ecs", "ec2", "logs")}

    def _error(self, service: str, method: str, error: Exception) -> AWSRequestError:
        operation = self._clients[service].meta.method_to_api_mapping.get(method, method)
        if isinstance(error, ClientError):
            details = error.response.get("Error", {})
            attempts = error.response.get("ResponseMetadata", {}).get("RetryAttempts")
            return AWSRequestError(service, operation, details.get("Code", "Unknown"),
                                   details.get("Message", str(error)), self.region,
                                   None if attempts is None else attempts + 1)
        return AWSRequestError(service, operation, type(error).__name__, str(error),
                               self.region)

    def call(self, service: str, method: str, **arguments: Any) -> dict[str, Any]:
        """Call ``client.method(**arguments)`` of ``service`` ("ecs", "ec2" or "logs")."""
        try:
            return getattr(self._clients[service], method)(**arguments)
        except (ClientError, BotoCoreError) as error:
            raise self._error(service, method, error) from error

    def pages(self, service: str, method: str, **arguments: Any) -> Iterator[dict[str, Any]]:
        """The pages of a paginated call."""
        paginator = self._clients[service].get_paginator(method)
        try:
            yield from paginator.paginate(**arguments)
        except (ClientError, BotoCoreError) as error:
            raise self._error(service, method, error) from error
