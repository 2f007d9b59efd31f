-- Expert usage per layer: how many tokens each expert received at each MoE layer.
-- Every one of a token's k choices counts; -1 (a token dropped over an expert's capacity,
-- as Switch Transformers does) is no expert and is left out.
--
-- Variables: store (the trace store directory).
--   DuckDB shell:  SET VARIABLE store = 'runs/traces';  .read expert_usage.sql
--   specmoe:       specmoe traces query runs/traces expert_usage
-- Columns: stack, layer (0-based, counting MoE layers only), expert, tokens.

WITH top_k AS (
    SELECT model.top_k AS k FROM read_json(getvariable('store') || '/manifest.json')
),
routing AS (
    UNPIVOT (SELECT COLUMNS('\.expert_ids$') FROM read_parquet(getvariable('store') || '/shard-*.parquet'))
    ON COLUMNS(*) INTO NAME stack VALUE expert_ids
),
choices AS (
    SELECT stack, unnest(range(len(expert_ids))) AS slot, unnest(expert_ids) AS expert FROM routing
)
SELECT replace(stack, '.expert_ids', '') AS stack, slot // k AS layer, expert, count(*) AS tokens
FROM choices, top_k
WHERE expert >= 0
GROUP BY ALL
ORDER BY ALL;
