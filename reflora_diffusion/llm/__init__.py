"""Language-model side: GLUE and commonsense data, prompts, metrics, and the transformers Trainer integration.

Submodules are imported on use (`from reflora_diffusion.llm.trainer import RefactorTrainer`) so that importing
the package does not pull in transformers.
"""
