-- Give back places taken by fleet_enter.lua or fleet_claim.lua.
--
-- ARGV[A..]  the places.
--
-- Returns how many were still held (a lapsed place was counted out when it lapsed).
local released = 0
for i = A, #ARGV do released = released + release_place(ARGV[i]) end
return released
