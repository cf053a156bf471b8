-- Shared by the UCX specs (ucx_*_spec.lua).
local M = {}

-- Deterministic bytes of a given size (a repeated pattern with a marker).
function M.payload(size, seed)
    local unit = ("%08d"):format(seed % 100000000)
    local s = unit:rep(math.ceil(size / #unit)):sub(1, size)
    return s
end

return M
