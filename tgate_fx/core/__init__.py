"""The method-neutral core: capture, analysis, the method interface, plan, variants, runtime, generation accounting."""
