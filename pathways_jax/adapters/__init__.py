"""Parameter-efficient fine-tuning: LoRA adapters (`lora`)."""
