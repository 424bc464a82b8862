-- Argo CD health check for kquant.dev/QuantizedModel.
-- Install it under resource.customizations.health.kquant.dev_QuantizedModel in argocd-cm
-- (see docs/promotion.md). It reads only what the operator writes: observedGeneration,
-- the Ready condition, and the reasons of conditions that need a person.
local hs = {}
local needs_a_person = {
  BuildFailed = true, ReportMissing = true, SecretNotFound = true, ConfigNotFound = true, BuildBlocked = true,
  GateFailed = true, DoesNotFit = true, NoGPUNodes = true, InvalidSpec = true, NoModelFacts = true,
  Conflict = true, Refused = true, PolicyViolation = true, ClaimTooSmall = true, NotServable = true,
}

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kquant operator to pick up this model"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local ready = nil
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    end
    if condition.status == "False" and needs_a_person[condition.reason] then
      hs.status = "Degraded"
      hs.message = condition.type .. " " .. condition.reason .. ": " .. (condition.message or "")
      return hs
    end
  end
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end

if obj.status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = (ready and ready.message) or "The model failed"
  return hs
end

hs.status = "Progressing"
hs.message = obj.status.progress or (ready and ready.message) or "Working"
return hs
