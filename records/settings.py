"""One settings object for the whole service, read from the environment and an optional TOML file.

Environment variables use the prefix ``RADVLM_`` and ``__`` between nested names, e.g.
``RADVLM_NODE__AE_TITLE=RADVLM`` or ``RADVLM_DATABASE_URL=postgresql+psycopg://...``.
A TOML file (``--config FILE`` or ``RADVLM_CONFIG_FILE``) holds the same keys in sections.
Secrets (passwords in URLs, API keys, private keys' paths) come from the environment or from files in
``RADVLM_SECRETS_DIR`` (Docker and Kubernetes secrets, e.g. ``/run/secrets``), one file per setting named
like its variable: ``radvlm_database_url``, ``radvlm_model__server_api_key``; never from the repository.
Explicit arguments win over the environment, the environment over secret files, those over the TOML file.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from records.findings import FINDINGS
from records.logs import LogFormat

CONFIG_FILE_ENV = "RADVLM_CONFIG_FILE"
SECRETS_DIR_ENV = "RADVLM_SECRETS_DIR"


def _check_ae_title(value: str) -> str:
    """AE titles are 1-16 characters of the default repertoire, no backslash or control codes."""
    stripped = value.strip()
    if not 1 <= len(stripped) <= 16 or "\\" in stripped or not stripped.isprintable():
        raise ValueError(f"invalid AE title {value!r}: 1 to 16 printable characters, no backslash")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


class Section(BaseModel):
    """A settings section: an unknown key is an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class CallerRule(Section):
    """A peer allowed to open associations: its calling AE title and, optionally, its address."""

    ae_title: AETitle
    host: str | None = Field(default=None, description="IP address the peer connects from; None: any")

    def matches(self, ae_title: str, address: str) -> bool:
        return ae_title == self.ae_title and (self.host is None or self.host == address)


class NodeTLS(Section):
    """DICOM TLS (PS3.15 B.1) on a second listener: the plain port keeps serving peers without TLS
    unless ``plain_listener`` is off."""

    port: int = Field(default=2762, ge=0, le=65535, description="2762: the registered DICOM TLS port")
    cert_file: Path = Field(description="our certificate chain, PEM")
    key_file: Path = Field(description="its private key, PEM (mount it as a secret file)")
    ca_file: Path | None = Field(default=None, description="CA bundle that signs the client certificates")
    require_client_cert: bool = Field(default=False, description="refuse a peer without a certificate the "
                                                                 "CA bundle verifies")
    plain_listener: bool = Field(default=True, description="also listen without TLS on node.port")

    @model_validator(mode="after")
    def _client_certs_need_a_ca(self) -> NodeTLS:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("node.tls.require_client_cert needs node.tls.ca_file to verify client certificates")
        return self


class NodeSettings(Section):
    """The DICOM node: listening address, who may call, and when a study counts as complete."""

    ae_title: AETitle = "RADVLM"
    bind_address: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    allowed_callers: list[CallerRule] = Field(
        default_factory=list,
        description="empty: any caller is accepted (a warning is logged at start)",
    )
    max_associations: int = Field(default=10, ge=1)
    max_pdu_bytes: int = Field(default=4 * 1024 * 1024, ge=0, description="0: unlimited")
    disk_reserve_mb: int = Field(default=1024, ge=0, description="refuse stores below this free space")
    fsync: bool = Field(default=True, description="fsync each stored file before answering success")
    stable_age_s: float = Field(default=10.0, gt=0, description="quiet time after which a study is complete")
    completion_poll_s: float = Field(default=1.0, gt=0)
    max_image_megapixels: float = Field(
        default=100.0, gt=0, description="an image larger than this (Rows x Columns x frames, at 16 bits) is skipped "
                                         "with the reason before anything is decoded")
    analyse_for_processing: bool = Field(
        default=False, description="also analyse 'For Processing' images (raw detector data, which RadVLM never "
                                   "saw); by default they are skipped with the reason 'for processing'")
    keep_images_days: float = Field(
        default=30, ge=0, description="a finished study's received files are removed once it has been quiet this "
                                      "long (the PACS keeps the images; results and history stay); 0: kept")
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 120.0
    metrics_port: int = Field(default=9101, ge=0, le=65535,
                              description="Prometheus metrics of the node process (radvlm-pacs node); 0: off")
    tls: NodeTLS | None = Field(default=None, description="DICOM TLS listener; None: plain TCP only")


class ModelSettings(Section):
    """Which RadVLM to load and how. ``backend = "scripted"`` is the test double: never for patients."""

    id: str = Field(default="KrauthammerLab/RadVLM", description="Hugging Face model id or a local folder")
    revision: str | None = None
    backend: Literal["transformers", "openai-server", "scripted"] = Field(
        default="transformers", description="transformers: in-process on this GPU; openai-server: the site's "
                                            "vLLM / SGLang server at server_url")
    device: str = Field(default="auto", description="auto: cuda if available, else cpu")
    quantization: Literal["8bit", "4bit"] | None = Field(default=None, description="bitsandbytes, GPUs < 24 GB")
    max_new_tokens: int = Field(default=1500, ge=1)
    prefix_cache_mb: int = Field(default=4096, ge=0,
                                 description="keep each image's prefilled prefix (KV cache) for the study's other "
                                             "questions and its chat, within this budget; 0: off")
    batch_cache_mb: int | None = Field(default=None, ge=1,
                                       description="KV cache of the images and questions decoding together (all "
                                                   "studies and chats), allocated at start as one prefix slot per "
                                                   "image in flight and one row per question, at most 64 rows; "
                                                   "None: up to 16 GiB of what the GPU has left after the weights, "
                                                   "the prefix cache and 6 GiB for prefill (2 GiB on a CPU)")
    max_prompt_tokens: int = Field(default=10240, ge=1,
                                   description="the longest prompt a question takes: the image's ~7,300 tokens "
                                               "and the conversation; a longer chat is refused with this name")
    prefill_chunk_tokens: int = Field(default=1024, ge=0,
                                      description="a new image's ~7,300 prefix tokens are prefilled this many at "
                                                  "a time, with a decode step between, so answers being written "
                                                  "(a radiologist's chat) never wait a whole image; 0: at once")
    compile_decode: bool | None = Field(default=None,
                                        description="compile the decode step once per start (dynamic batch and "
                                                    "span sizes); a failure is an error and radvlm_engine_compiled "
                                                    "0; None: on a CUDA GPU")
    regions: list[str] = Field(default_factory=list,
                               description="anatomical regions to ground on every image, e.g. 'right lung'")
    server_url: str | None = Field(default=None, description="openai-server: e.g. http://vllm:8000/v1")
    server_model: str | None = Field(default=None, description="openai-server: the served model name; default id")
    server_api_key: SecretStr | None = Field(default=None, description="a secret: environment or secret file")
    server_timeout_s: float = Field(default=300, gt=0)
    scripted_delay_s: float = Field(default=0.0, ge=0,
                                    description="scripted backend only: seconds per answer (a slow GPU in tests)")


    @model_validator(mode="after")
    def _server_has_url(self) -> ModelSettings:
        if self.backend == "openai-server" and not self.server_url:
            raise ValueError("model.backend openai-server needs model.server_url (e.g. http://vllm:8000/v1)")
        return self


class PriorityRule(Section):
    """A study is STAT when a header attribute (top level or in RequestAttributesSequence) has this value."""

    keyword: str
    value: str


class WorkerSettings(Section):
    """Celery job behaviour: limits, retries, redelivery, priority."""

    task_time_limit_s: float = Field(default=900, gt=0)
    max_retries: int = Field(default=5, ge=0)
    retry_backoff_s: float = Field(default=10, gt=0)
    visibility_timeout_s: float = Field(default=3600, gt=0,
                                        description="Redis redelivers an unacknowledged task after this long")
    lapse_grace_s: float = Field(default=15, gt=0,
                                 description="a GPU worker is taken for dead once its Redis announcement (renewed "
                                             "every 5 s, kept 15 s) has been gone this long: an io worker then "
                                             "queues its running analyses again and fails its questions, long "
                                             "before the visibility timeout")
    stat_rules: list[PriorityRule] = Field(default_factory=lambda: [
        PriorityRule(keyword="RequestedProcedurePriority", value="STAT"),
        PriorityRule(keyword="ScheduledProcedureStepPriority", value="HIGH"),
    ], description="a study any of whose images matches a rule (in the dataset or its Request Attributes "
                   "Sequence) is analysed first; the node judges it when the study completes")
    metrics_port: int = Field(default=9102, ge=0, le=65535,
                              description="Prometheus metrics of a worker process; 0: off")
    concurrency: int = Field(default=1, ge=1,
                             description="tasks one worker process runs at once; above 1, as threads: on a gpu "
                                         "worker, the studies and chat questions whose decode steps the model shares "
                                         "(a lost Redis connection then stops the process: run it under a "
                                         "supervisor that restarts it, as compose does for its GPU workers)")

    @model_validator(mode="after")
    def _redelivery_after_time_limit(self) -> WorkerSettings:
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError("visibility_timeout_s must exceed task_time_limit_s, or Redis hands a running "
                             "task to a second worker")
        return self


DicomObject = Literal["sr", "narrative", "gsps", "sc"]


class Destination(Section):
    """A peer (the PACS) that receives the results: by C-STORE (ae_title, host, port) or by STOW-RS
    (stow_url, and a bearer token if it asks for one)."""

    name: str
    ae_title: AETitle | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    stow_url: str | None = Field(default=None, pattern=r"^https?://", description="DICOMweb service root, e.g. "
                                 "http://pacs:8042/dicom-web: results go by STOW-RS instead of C-STORE")
    stow_token: SecretStr | None = Field(default=None, description="bearer token for stow_url (keep it in "
                                                                    "RADVLM_DESTINATIONS or the secrets folder)")
    objects: list[DicomObject] = Field(default_factory=lambda: ["sr", "narrative", "gsps"],
                                       description="sc (boxes burned into a copy of the image) is off by default")
    tls: bool = False
    tls_ca_file: Path | None = Field(default=None, description="CA bundle to verify the peer (TLS)")
    tls_cert_file: Path | None = Field(default=None, description="our client certificate, if the peer asks")
    tls_key_file: Path | None = None

    @model_validator(mode="after")
    def _one_way_to_send(self) -> Destination:
        dimse = (self.ae_title, self.host, self.port)
        if self.stow_url is None and None in dimse:
            raise ValueError(f"destination {self.name}: give ae_title, host and port (C-STORE) or stow_url (STOW-RS)")
        if self.stow_url is not None and any(v is not None for v in dimse):
            raise ValueError(f"destination {self.name}: stow_url or ae_title/host/port, not both")
        return self

    @property
    def address(self) -> str:
        return self.stow_url or f"{self.ae_title}@{self.host}:{self.port}"


class HL7Settings(Section):
    """The RIS endpoint for ORU^R01 results over MLLP."""

    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = "RADVLM"
    sending_facility: str = "RADVLM"
    receiving_application: str = "RIS"
    receiving_facility: str = "RIS"


class FhirSettings(Section):
    """An EHR's FHIR R4 endpoint for the result as a transaction Bundle (DiagnosticReport and Observations)."""

    base_url: str = Field(pattern=r"^https?://", description="the server's base, where the transaction is POSTed")
    token: SecretStr | None = Field(default=None, description="bearer token (environment or secrets folder)")
    patient_identifier_system: str = Field(default="urn:radvlm:patient-id",
                                           description="the system URI of the site's patient IDs (DICOM PatientID)")


class ApiUser(Section):
    """A user of the API. Only the SHA-256 of the token is configured: no secret in the settings."""

    name: str = Field(max_length=64)
    role: Literal["radiologist", "admin", "sender"] = Field(
        default="radiologist", description="radiologist: read, ask, sign off; admin: read all studies and the audit; "
                                           "sender: store studies by STOW-RS, nothing else (a DICOMweb archive's "
                                           "place on the allow-list)")
    ae_title: AETitle | None = Field(default=None, description="sender: the calling AE title its instances are "
                                                                "recorded under, as if sent by C-STORE")
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 hex of the bearer token")
    expires: datetime | None = Field(default=None, description="the token is refused from then on (ISO 8601 "
                                                               "with offset); None: until removed")
    person_name: str | None = Field(default=None, description="DICOM PN (Family^Given) for sign-offs; default name")
    sources: list[AETitle] = Field(
        default_factory=list,
        description="calling AE titles whose studies this user sees; empty: every study (admins see all)")

    @property
    def observer_name(self) -> str:
        return self.person_name or self.name

    @model_validator(mode="after")
    def _sender_has_ae_title(self) -> ApiUser:
        if self.role == "sender" and self.ae_title is None:
            raise ValueError(f"user {self.name}: a sender needs ae_title (what its studies are recorded as sent by)")
        return self

    @field_validator("expires")
    @classmethod
    def _expiry_has_offset(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.utcoffset() is None:
            raise ValueError("expires needs a UTC offset, e.g. 2027-03-01T00:00:00Z")
        return value


class ApiSettings(Section):
    """The REST API: where it listens (HTTPS once given a certificate and its key), who may use it, and the limits on
    failed log-ins and on conversations."""

    bind_address: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    tls_cert_file: Path | None = Field(default=None, description="HTTPS: certificate chain, PEM; None: plain HTTP "
                                                                 "(behind a TLS proxy, or on loopback only)")
    tls_key_file: Path | None = Field(default=None, description="HTTPS: its private key (a secret file)")
    users: list[ApiUser] = Field(default_factory=list, description="no users: every route but health is closed")
    organization: str = Field(default="Radiology", max_length=64,
                              description="the verifying organization named in signed-off reports")
    chat_timeout_s: float = Field(default=120, gt=0, description="a plain JSON question waits this long")
    failed_logins_per_minute: int = Field(default=20, ge=1,
                                          description="failed log-ins audited per client address and minute; "
                                                      "beyond, the address's further failures get 429 (valid "
                                                      "tokens still pass)")
    chat_max_rounds: int = Field(default=10, ge=1,
                                 description="questions per conversation (RadVLM trained on 5-10 rounds)")

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("api.tls_cert_file and api.tls_key_file go together")
        return self

    @property
    def scheme(self) -> str:
        return "http" if self.tls_cert_file is None else "https"


def _check_finding(value: str) -> str:
    """A CheXpert label, in any case, given back as the model's results name it (a misspelt name would
    otherwise flag nothing, silently)."""
    labels = {label.lower(): label for label in FINDINGS}
    label = labels.get(value.strip().lower())
    if label is None:
        raise ValueError(f"{value!r} is not a CheXpert finding; one of: {', '.join(labels.values())}")
    return label


Finding = Annotated[str, AfterValidator(_check_finding)]


class DeliverySettings(Section):
    """Retries: an object waits in the outbox until its destination confirms, for as long as this;
    and which findings every result flags as critical."""

    urgent_findings: list[Finding] = Field(default_factory=lambda: ["Pneumothorax"],
                                           description="CheXpert labels flagged critical (AA) in the HL7 and FHIR "
                                                       "results when present, and urgent in the worklist")

    deliver_for_s: float = Field(default=7 * 24 * 3600, gt=0)
    retry_backoff_s: float = Field(default=5, gt=0)
    max_backoff_s: float = Field(default=600, gt=0)
    timeout_s: float = Field(default=30, gt=0, description="network and DIMSE timeout per attempt")
    sweep_s: float = Field(default=30, gt=0, description="how often an io worker looks for items whose message "
                           "was lost (a broker restarted without its data, a send that failed)")
    sweep_grace_s: float = Field(default=120, ge=0, description="an item overdue by this long while the io "
                                 "queue is empty has lost its message and is queued again (a duplicate is harmless)")


class DicomWebSettings(Section):
    """The node's own DICOMweb service on the API (``/dicom-web``): STOW-RS in (sender tokens), and
    QIDO-RS / WADO-RS for the objects it produced, so a DICOMweb viewer can read them from the node."""

    results: list[DicomObject] = Field(default_factory=lambda: ["sr", "narrative", "gsps"],
                                       description="the produced objects kept for QIDO-RS / WADO-RS; empty: none")


class AuditSettings(Section):
    """Every audit event is in the database (``GET /audit``); a site's ATNA audit record repository can
    receive them too, as DICOM audit messages over syslog (RFC 5424 on UDP; for TLS, a local relay)."""

    syslog_host: str | None = Field(default=None, description="audit record repository; None: database only")
    syslog_port: int = Field(default=514, ge=1, le=65535)


class Settings(BaseSettings):
    """Effective configuration. Paths left unset are derived from ``data_dir``."""

    model_config = SettingsConfigDict(
        env_prefix="RADVLM_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    data_dir: Path = Path("radvlm-data")
    database_url: str | None = Field(default=None, description="default: SQLite in data_dir")
    storage_dir: Path | None = Field(default=None, description="default: data_dir/dicom")
    broker_url: str | None = Field(default=None, description="Redis URL; None runs jobs in-process")
    log_level: str = "INFO"
    log_format: LogFormat = Field(default="text", description="json: one object per line, for a log collector")
    node: NodeSettings = Field(default_factory=NodeSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    destinations: list[Destination] = Field(default_factory=list)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    hl7: HL7Settings | None = None
    fhir: FhirSettings | None = None
    api: ApiSettings = Field(default_factory=ApiSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    dicomweb: DicomWebSettings = Field(default_factory=DicomWebSettings)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: object) -> object:
        """Say where a setting went, rather than only that the old key is unknown."""
        if isinstance(data, dict):
            for section in ("hl7", "fhir"):
                if isinstance(data.get(section), dict) and "urgent_findings" in data[section]:
                    raise ValueError(f"{section}.urgent_findings is now delivery.urgent_findings "
                                     "(one list for the HL7 and FHIR results)")
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        secrets = (NestedSecretsSettingsSource(file_secret_settings),) if settings_cls.model_config.get(
            "secrets_dir") else ()
        return (init_settings, env_settings, *secrets, TomlConfigSettingsSource(settings_cls))

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'radvlm.sqlite').resolve()}"

    @property
    def effective_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "dicom").resolve()


def load_settings(config_file: Path | None = None, secrets_dir: Path | None = None) -> Settings:
    """Read settings from the environment, ``secrets_dir`` (or ``RADVLM_SECRETS_DIR``) and ``config_file``
    (or ``RADVLM_CONFIG_FILE``)."""
    path = config_file or os.environ.get(CONFIG_FILE_ENV)
    secrets = secrets_dir or os.environ.get(SECRETS_DIR_ENV)
    if path and not Path(path).is_file():
        raise FileNotFoundError(f"configuration file {path}: no such file")
    if secrets and not Path(secrets).is_dir():
        raise FileNotFoundError(f"secrets folder {secrets}: no such folder")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path, secrets_dir=secrets,
                                          secrets_nested_delimiter="__" if secrets else None)

    return FileSettings()
