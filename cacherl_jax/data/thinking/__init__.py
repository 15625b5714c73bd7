"""Hybrid thinking trajectories: teacher-written reasoning for the steps of agent trajectories.

    cacherl augment --config=configs/augment.py --input=data/raw.jsonl --output=data/thinking.jsonl

`sources` (JSONL, BFCL ground truth executed live, the procedural solver; calls recorded into the
tool cache), `teachers` (OpenAI-compatible endpoint, local checkpoint, template), `rules` (which
steps get reasoning and what is accepted), `prompts` (what a teacher is asked), `output`
(resumable JSONL and the summary) and `pipeline` (the run and `augment_main`).
"""

from cacherl_jax.data.thinking.output import ResumableOutput, sidecar_paths
from cacherl_jax.data.thinking.pipeline import (
    AugmentError,
    AugmentRun,
    RunSettings,
    augment,
    augment_main,
    explain_step,
)
from cacherl_jax.data.thinking.prompts import PromptLimits, teacher_messages
from cacherl_jax.data.thinking.rules import (
    AugmentRules,
    Step,
    plan_record,
    validate_reasoning,
)
from cacherl_jax.data.thinking.sources import (
    BfclSource,
    CacheRecorder,
    JsonlSource,
    ProceduralSource,
    bfcl_trajectory,
    source_from_spec,
)
from cacherl_jax.data.thinking.teachers import (
    EndpointConfig,
    EndpointTeacher,
    LocalConfig,
    LocalTeacher,
    Teacher,
    TeacherError,
    TeacherReply,
    TeacherRequest,
    TemplateTeacher,
    make_teacher,
    template_reasoning,
)

__all__ = [
    "AugmentError",
    "AugmentRules",
    "AugmentRun",
    "BfclSource",
    "CacheRecorder",
    "EndpointConfig",
    "EndpointTeacher",
    "JsonlSource",
    "LocalConfig",
    "LocalTeacher",
    "ProceduralSource",
    "PromptLimits",
    "ResumableOutput",
    "RunSettings",
    "Step",
    "Teacher",
    "TeacherError",
    "TeacherReply",
    "TeacherRequest",
    "TemplateTeacher",
    "augment",
    "augment_main",
    "bfcl_trajectory",
    "explain_step",
    "make_teacher",
    "plan_record",
    "sidecar_paths",
    "source_from_spec",
    "teacher_messages",
    "template_reasoning",
    "validate_reasoning",
]
