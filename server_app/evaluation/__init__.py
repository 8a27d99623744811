"""Task evaluators: GSM8K, Banking77, HumanEval and perplexity, on any causal LM."""
