"""The engine: sequences, paged KV block manager, scheduler, runner, sampler, output."""
